"""Reading the text files users give lorakit (data, run configs, prompt files) as UTF-8, with errors that name
the file, the line, the column and the byte, and say what the encoding probably is.

    text = read_text("data/train.csv", "data files")

A UTF-8 byte-order mark (what Excel and Notepad put in front of "UTF-8" files) is dropped, so a CSV header reads
`instruction`, not `\\ufeffinstruction`. A UTF-16 or UTF-32 file is recognised by its byte-order mark and refused
with the command that converts it.
"""

from __future__ import annotations

import codecs

# Longest first: the UTF-32 LE mark starts with the UTF-16 LE one.
OTHER_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32LE"), (codecs.BOM_UTF32_BE, "UTF-32BE"),
              (codecs.BOM_UTF16_LE, "UTF-16LE"), (codecs.BOM_UTF16_BE, "UTF-16BE"))


def read_text(path: str, what: str = "files") -> str:
    """The whole file as text. `what` names the kind of file in messages ("data files", "run configs")."""
    with open(path, "rb") as fh:
        data = fh.read()
    return decode_text(data, path, what)


def decode_text(data: bytes, path: str, what: str = "files") -> str:
    for bom, encoding in OTHER_BOMS:
        if data.startswith(bom):
            raise ValueError(
                f"{path} is {encoding} text (it starts with a {encoding} byte-order mark); lorakit reads {what} as "
                f"UTF-8. Save it as UTF-8, e.g. iconv -f {encoding} -t UTF-8 {path} > converted{_suffix(path)}")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        encoding = _likely_encoding(data)
        guess = f"; it looks like Windows-1252 ({encoding}) text" if encoding else ""
        raise ValueError(
            f"{path}, line {line}, column {column}: byte 0x{data[err.start]:02x} is not valid UTF-8 (lorakit reads "
            f"{what} as UTF-8){guess}. Save the file as UTF-8, e.g. iconv -f {encoding or '<its encoding>'} -t UTF-8 "
            f"{path} > converted{_suffix(path)}") from None


def _likely_encoding(data: bytes) -> str | None:
    """Windows-1252 (Western European Windows, a superset of Latin-1 in the printable range) when it decodes."""
    try:
        data.decode("cp1252")
    except UnicodeDecodeError:
        return None
    return "CP1252"


def _suffix(path: str) -> str:
    dot = path.rfind(".")
    return path[dot:] if dot > path.rfind("/") else ""
