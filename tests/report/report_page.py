"""Reading an exported HTML page back: every element with its attributes and text, and the
data embedded for the page's script."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser

VOID = {"meta", "br", "img", "input", "link", "hr", "col", "area", "base", "wbr", "source"}


class Element:
    def __init__(self, tag, attrs, parent):
        self.tag, self.attrs, self.parent = tag, dict(attrs), parent
        self.children, self.text = [], ""

    def iter(self):
        yield self
        for c in self.children:
            yield from c.iter()

    def find_all(self, tag=None, **attrs):
        return [e for e in self.iter() if (tag is None or e.tag == tag)
                and all(e.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def all_text(self):
        return self.text + "".join(c.all_text() for c in self.children)


class Page(HTMLParser):
    """Parses a whole page; raises if tags do not nest (a broken page)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.root = Element("#root", {}, None)
        self.cur = self.root
        self.feed(text)
        self.close()
        assert self.cur is self.root, f"unclosed <{self.cur.tag}>"

    def handle_starttag(self, tag, attrs):
        e = Element(tag, attrs, self.cur)
        self.cur.children.append(e)
        if tag not in VOID:
            self.cur = e

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Element(tag, attrs, self.cur))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.cur.tag == tag, f"</{tag}> closes <{self.cur.tag}>"
        self.cur = self.cur.parent

    def handle_data(self, data):
        self.cur.text += data

    def find_all(self, tag=None, **attrs):
        return self.root.find_all(tag, **attrs)

    def by_id(self, id_):
        found = self.root.find_all(id=id_)
        assert len(found) == 1, f"{len(found)} elements with id {id_}"
        return found[0]

    def data(self) -> dict:
        return json.loads(self.by_id("memprof-data").text)


def path_ys(d: str) -> list[int]:
    """The y coordinates of an SVG path made of M x,y / V y / H x commands."""
    ys = [int(v) for v in re.findall(r"V(-?\d+)", d)]
    m = re.match(r"M-?\d+,(-?\d+)", d)
    return ys + ([int(m.group(1))] if m else [])
