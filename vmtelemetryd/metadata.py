"""Who a VM is, from its domain XML: pure, so it is tested without libvirt.

The keys are DESIGN.md's ``vm_info`` tags: the domain's ``<title>``, the
OpenNebula id from a domain named ``one-<ID>``, OpenNebula's ``one:vm``
block and Nova's ``nova:instance`` block (1.0 and 1.1 namespaces).

The values are tenant-controlled text (an OpenNebula VM's name is its
user's): they are kept exactly as the XML holds them, after XML's own
unescaping, and left to the encoder to make safe. An empty value is left
out, as a tag cannot be empty; so is XML that does not parse.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping

ONE_NS = "http://opennebula.org/xmlns/libvirt/1.0"
NOVA_NAMESPACES = (
    "http://openstack.org/xmlns/libvirt/nova/1.1",
    "http://openstack.org/xmlns/libvirt/nova/1.0",
)

METADATA_KEYS: tuple[str, ...] = (
    "title",
    "one_vm_id",
    "one_name",
    "one_owner",
    "one_group",
    "nova_name",
    "nova_flavor",
    "nova_project",
    "nova_project_id",
    "nova_user",
    "nova_user_id",
)

_ONE_DOMAIN = re.compile(r"one-(\d+)")
_ONE_ELEMENTS = {"one_name": "name", "one_owner": "uname", "one_group": "gname"}


def parse_metadata(name: str, xml: str) -> dict[str, str]:
    """The ``vm_info`` keys of domain ``name`` that have a value."""
    keys: dict[str, str | None] = {}
    one_id = _ONE_DOMAIN.fullmatch(name)
    if one_id is not None:
        keys["one_vm_id"] = one_id.group(1)
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return _present(keys)
    keys["title"] = root.findtext("title")
    metadata = root.find("metadata")
    if metadata is not None:
        keys.update(_opennebula(metadata))
        keys.update(_nova(metadata))
    return _present(keys)


def _opennebula(metadata: ET.Element) -> dict[str, str | None]:
    block = metadata.find(f"{{{ONE_NS}}}vm")
    if block is None:
        return {}
    return {key: block.findtext(f"{{{ONE_NS}}}{tag}") for key, tag in _ONE_ELEMENTS.items()}


def _nova(metadata: ET.Element) -> dict[str, str | None]:
    for ns in NOVA_NAMESPACES:
        block = metadata.find(f"{{{ns}}}instance")
        if block is not None:
            break
    else:
        return {}
    flavor = block.find(f"{{{ns}}}flavor")
    user = block.find(f"{{{ns}}}owner/{{{ns}}}user")
    project = block.find(f"{{{ns}}}owner/{{{ns}}}project")
    return {
        "nova_name": block.findtext(f"{{{ns}}}name"),
        "nova_flavor": flavor.get("name") if flavor is not None else None,
        "nova_project": project.text if project is not None else None,
        "nova_project_id": project.get("uuid") if project is not None else None,
        "nova_user": user.text if user is not None else None,
        "nova_user_id": user.get("uuid") if user is not None else None,
    }


def _present(keys: Mapping[str, str | None]) -> dict[str, str]:
    return {key: value for key, value in keys.items() if value}
