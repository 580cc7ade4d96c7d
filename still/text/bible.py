"""The World English Bible from Debian's ``sword-text-web``, read with the standard library.

The package installs a SWORD zText module (``engWEB2015eb``): per testament, ``.bzz``
holds zlib-compressed blocks of OSIS markup, ``.bzs`` locates each block (little-endian
uint32 offset, compressed size, uncompressed size) and ``.bzv`` locates each entry of the
versification in canonical order (uint32 block, uint32 offset in the decompressed block,
uint16 size). The first two entries of a testament are the module and testament
headings; then each book has a heading entry and each chapter a heading entry before
its verses.

The module's versification is NRSVA, not KJV: its Old Testament index also holds the
deuterocanonical books, osis2mod appended text the versification lacks (the Greek
portions of Daniel) to the entry before it, and the preface and glossary ride in heading
and last-verse entries. Counting verses per book would therefore misplace text, so the
entries are read in index order and cut at the OSIS chapter milestones
(``<chapter sID="Gen.1"/>`` … ``<chapter eID="Gen.1"/>``) that every chapter carries: a
book is its chapters' text, in order, with no book titles, preface or glossary. Only
the 66 books of :data:`BOOKS` are kept; each one's chapters must run 1..n with n as the
table says, or the module is refused.
"""

from __future__ import annotations

import dataclasses
import html
import re
import struct
import zlib
from pathlib import Path

from still.errors import StillError

SWORD_MODULE_DIR = Path("/usr/share/sword/modules/texts/ztext/engWEB2015eb")
"""Where Debian's ``sword-text-web`` installs the module's ``{ot,nt}.{bzs,bzv,bzz}``."""

INSTALL_HINT = "install the Debian package sword-text-web ('apt-get install sword-text-web')"

BOOKS: tuple[tuple[str, str, int], ...] = (
    # (OSIS id, name, chapters), Old Testament then New, in canonical order
    ("Gen", "Genesis", 50), ("Exod", "Exodus", 40), ("Lev", "Leviticus", 27), ("Num", "Numbers", 36),
    ("Deut", "Deuteronomy", 34), ("Josh", "Joshua", 24), ("Judg", "Judges", 21), ("Ruth", "Ruth", 4),
    ("1Sam", "1 Samuel", 31), ("2Sam", "2 Samuel", 24), ("1Kgs", "1 Kings", 22), ("2Kgs", "2 Kings", 25),
    ("1Chr", "1 Chronicles", 29), ("2Chr", "2 Chronicles", 36), ("Ezra", "Ezra", 10),
    ("Neh", "Nehemiah", 13), ("Esth", "Esther", 10), ("Job", "Job", 42), ("Ps", "Psalms", 150),
    ("Prov", "Proverbs", 31), ("Eccl", "Ecclesiastes", 12), ("Song", "Song of Solomon", 8),
    ("Isa", "Isaiah", 66), ("Jer", "Jeremiah", 52), ("Lam", "Lamentations", 5), ("Ezek", "Ezekiel", 48),
    ("Dan", "Daniel", 12), ("Hos", "Hosea", 14), ("Joel", "Joel", 3), ("Amos", "Amos", 9),
    ("Obad", "Obadiah", 1), ("Jonah", "Jonah", 4), ("Mic", "Micah", 7), ("Nah", "Nahum", 3),
    ("Hab", "Habakkuk", 3), ("Zeph", "Zephaniah", 3), ("Hag", "Haggai", 2), ("Zech", "Zechariah", 14),
    ("Mal", "Malachi", 4),
    ("Matt", "Matthew", 28), ("Mark", "Mark", 16), ("Luke", "Luke", 24), ("John", "John", 21),
    ("Acts", "Acts", 28), ("Rom", "Romans", 16), ("1Cor", "1 Corinthians", 16),
    ("2Cor", "2 Corinthians", 13), ("Gal", "Galatians", 6), ("Eph", "Ephesians", 6),
    ("Phil", "Philippians", 4), ("Col", "Colossians", 4), ("1Thess", "1 Thessalonians", 5),
    ("2Thess", "2 Thessalonians", 3), ("1Tim", "1 Timothy", 6), ("2Tim", "2 Timothy", 4),
    ("Titus", "Titus", 3), ("Phlm", "Philemon", 1), ("Heb", "Hebrews", 13), ("Jas", "James", 5),
    ("1Pet", "1 Peter", 5), ("2Pet", "2 Peter", 3), ("1John", "1 John", 5), ("2John", "2 John", 1),
    ("3John", "3 John", 1), ("Jude", "Jude", 1), ("Rev", "Revelation", 22),
)
"""The 39 + 27 books kept: OSIS id, English name, number of chapters."""
OT_BOOKS = 39

WEB_BIBLE_SPLITS: dict[str, tuple[str, ...]] = {
    "val": ("Joshua", "Ruth", "Jonah", "Mark", "Philemon"),
    "test": ("Judges", "Esther", "Micah", "Galatians", "James", "1 John"),
}
"""Books held out of training, by name; every other book is train. Fixed (no hash), from
both testaments, each side ≈ 5% of the characters (see ``tests/test_text.py``)."""

_ENTRY = struct.Struct("<IIH")
_BLOCK = struct.Struct("<III")
_NOTE = re.compile(r"<note\b[^>]*/>|<note\b.*?</note>", re.DOTALL)
# Tags inside a line of text: removed outright, so "God</w>," stays "God,".
_INLINE = re.compile(r"</?(?:w|q|seg|name|hi|transChange|foreign|divineName)\b[^>]*>")
# Every other tag (line, paragraph, chapter, title milestones) separates words.
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")
# Where a note stood: a space, unless punctuation or a space follows ("God<note/> created"
# and "God<note/>created" both read "God created"; "Christ<note/>," reads "Christ,").
_GAP = "\x00"
_GAP_BEFORE_PUNCTUATION = re.compile(_GAP + r"+(?=[\s,.;:!?’”)\]]|$)")
_CHAPTER = re.compile(r'<chapter\b[^>]*\b(sID|eID)="([^".]+)\.(\d+)"[^>]*/>')


@dataclasses.dataclass(frozen=True)
class Book:
    """One book of the Bible as plain text.

    Attributes:
        name: English name (``"Genesis"``, ``"1 John"``).
        testament: ``"OT"`` or ``"NT"``.
        text: Its chapters' text, notes and markup removed, whitespace normalised.
    """

    name: str
    testament: str
    text: str


def read_web_bible(module_dir: Path = SWORD_MODULE_DIR) -> list[Book]:
    """Reads the 66 books of the World English Bible, in canonical order.

    Args:
        module_dir: The zText module's folder (``{ot,nt}.{bzs,bzv,bzz}``).

    Raises:
        StillError: The module is not installed, or its files do not have the expected layout.
    """
    missing = [f"{t}.{ext}" for t in ("ot", "nt") for ext in ("bzs", "bzv", "bzz")
               if not (module_dir / f"{t}.{ext}").is_file()]
    if missing:
        raise StillError(f"builtin:web-bible: {module_dir} lacks {', '.join(missing)}; {INSTALL_HINT}")
    chapters: dict[str, dict[int, str]] = {}
    for testament in ("ot", "nt"):
        for book, number, markup in _chapters(_entries(module_dir, testament)):
            chapters.setdefault(book, {})[number] = markup
    books = []
    for index, (osis, name, count) in enumerate(BOOKS):
        found = chapters.get(osis, {})
        if sorted(found) != list(range(1, count + 1)):
            raise StillError(f"builtin:web-bible: {module_dir} has chapters {sorted(found)[:3]}… "
                             f"({len(found)}) of {name}, expected 1..{count}; reinstall sword-text-web")
        text = clean_osis(" ".join(found[n] for n in range(1, count + 1)))
        books.append(Book(name, "OT" if index < OT_BOOKS else "NT", text))
    return books


def clean_osis(markup: str) -> str:
    """Plain text of OSIS markup: notes dropped, tags stripped, entities unescaped,
    whitespace runs made one space."""
    text = _INLINE.sub("", _NOTE.sub(_GAP, markup))
    text = _TAG.sub(" ", _GAP_BEFORE_PUNCTUATION.sub("", text)).replace(_GAP, " ")
    return _SPACE.sub(" ", html.unescape(text)).strip()


def _entries(module_dir: Path, testament: str) -> list[str]:
    """Every index entry of one testament as markup, in index (canonical) order."""
    index = (module_dir / f"{testament}.bzv").read_bytes()
    table = (module_dir / f"{testament}.bzs").read_bytes()
    data = (module_dir / f"{testament}.bzz").read_bytes()
    if len(index) % _ENTRY.size or len(table) % _BLOCK.size:
        raise StillError(f"builtin:web-bible: {module_dir}/{testament}.bzv or .bzs is truncated; "
                         "reinstall sword-text-web")
    blocks: dict[int, bytes] = {}
    entries = []
    for block, offset, size in _ENTRY.iter_unpack(index):
        if not size:
            entries.append("")
            continue
        if block not in blocks:
            start, compressed, _ = _BLOCK.unpack_from(table, block * _BLOCK.size)
            blocks[block] = zlib.decompress(data[start:start + compressed])
        entries.append(blocks[block][offset:offset + size].decode("utf-8"))
    return entries


def _chapters(entries: list[str]):
    """Yields (OSIS book id, chapter number, markup) for every chapter milestone pair."""
    stream = " ".join(entries)
    open_at: dict[tuple[str, int], int] = {}
    for match in _CHAPTER.finditer(stream):
        kind, book, number = match.group(1), match.group(2), int(match.group(3))
        if kind == "sID":
            open_at[(book, number)] = match.end()
        elif (book, number) in open_at:
            yield book, number, stream[open_at.pop((book, number)):match.start()]
