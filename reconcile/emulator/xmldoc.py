"""`?format=xml` of a single item (project, subject, session, scan, resource), as XNAT writes it.

The emulator keeps one description of an item, the JSON `items` shape (`data_fields`, `children`);
the XML is laid out from it by the emulator's own `xnat.xsd`, as XNAT lays out its documents by
its schema: the root element is the one the schema declares for the type (`xnat:MRSession`),
schema attributes become attributes, schema elements become child elements in sequence order
(base type's first), nested items (`scans/scan`, `file`) carry their `xsi:type`. Fields the
schema does not know (the JSON's `id`, `URI` of a scan) are left out, as XNAT's XML has them not.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources as importlib_resources
from typing import Any
from xml.etree import ElementTree

XNAT_NS = "http://nrg.wustl.edu/xnat"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
_XS = "{http://www.w3.org/2001/XMLSchema}"


@dataclass(frozen=True)
class _Layout:
    """What the schema says of one complex type, inherited parts first."""

    attributes: tuple[str, ...]
    elements: tuple[str, ...]


@cache
def xsd_text() -> str:
    return importlib_resources.files(__package__).joinpath("xnat.xsd").read_text(encoding="utf-8")


@cache
def _schema() -> tuple[dict[str, str], dict[str, _Layout]]:
    """(type → its top-level element name, type → layout), both by local name (`mrSessionData`)."""
    root = ElementTree.fromstring(xsd_text())
    element_of = {el.get("type", "").partition(":")[2]: el.get("name", "") for el in root.findall(f"{_XS}element")}
    own: dict[str, tuple[str | None, list[str], list[str]]] = {}
    for ctype in root.findall(f"{_XS}complexType"):
        ext = ctype.find(f"{_XS}complexContent/{_XS}extension")
        body = ext if ext is not None else ctype
        base = ext.get("base", "").partition(":")[2] if ext is not None else None
        own[ctype.get("name", "")] = (
            base,
            [a.get("name", "") for a in body.findall(f"{_XS}attribute")],
            [e.get("name", "") for e in body.findall(f"{_XS}sequence/{_XS}element")],
        )

    def layout(name: str) -> _Layout:
        base, attributes, elements = own[name]
        inherited = layout(base) if base else _Layout((), ())
        return _Layout(inherited.attributes + tuple(attributes), inherited.elements + tuple(elements))

    return element_of, {name: layout(name) for name in own}


def item_document(xsi_type: str, fields: dict[str, Any], children: list[dict[str, Any]]) -> bytes:
    """The XML document of one item whose JSON form is `{meta, data_fields: fields, children}`."""
    ElementTree.register_namespace("xnat", XNAT_NS)
    ElementTree.register_namespace("xsi", XSI_NS)
    element_of, _ = _schema()
    local = xsi_type.partition(":")[2]
    root = _element(element_of.get(local, local), xsi_type, fields, children, typed=False)
    return ElementTree.tostring(root, encoding="UTF-8", xml_declaration=True)


def _element(tag: str, xsi_type: str, fields: dict[str, Any], children: list[dict[str, Any]],
             *, typed: bool) -> ElementTree.Element:
    layout = _schema()[1][xsi_type.partition(":")[2]]
    el = ElementTree.Element(f"{{{XNAT_NS}}}{tag}")
    for name in layout.attributes:
        if _present(fields.get(name)):
            el.set(name, str(fields[name]))
    if typed:  # a nested item says its type; the root's element already does
        el.set(f"{{{XSI_NS}}}type", xsi_type)
    nested = {c["field"]: c["items"] for c in children}
    for name in layout.elements:
        if _present(fields.get(name)):
            ElementTree.SubElement(el, f"{{{XNAT_NS}}}{name}").text = str(fields[name])
        for field, items in nested.items():
            head, _, leaf = field.partition("/")  # "scans/scan": a wrapper, then the items
            if head != name or not items:
                continue
            parent = ElementTree.SubElement(el, f"{{{XNAT_NS}}}{name}") if leaf else el
            for item in items:
                parent.append(_element(leaf or name, item["meta"]["xsi:type"], item["data_fields"],
                                       item.get("children", []), typed=True))
    return el


def _present(value: Any) -> bool:
    return value is not None and value != ""
