"""Kaggle Digit Recognizer CSVs: train.csv is `label,pixel0..pixel783` (42,000 rows), test.csv
is `pixel0..pixel783` (28,000 rows). Parsed with pandas' C reader, then checked strictly with
numpy; any problem is one line naming the file, the line and the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sweeper.settings.errors import UserError

N_PIXELS = 784
PIXELS = [f"pixel{i}" for i in range(N_PIXELS)]


def read_train(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N] int64)"""
    table = _read(path, ["label", *PIXELS], "train.csv")
    return table[:, 1:].astype(np.uint8).reshape(-1, 28, 28), table[:, 0]


def read_test(path: Path) -> np.ndarray:
    """images [N, 28, 28] uint8, in file order (Kaggle's ImageId = row + 1)"""
    return _read(path, PIXELS, "test.csv").astype(np.uint8).reshape(-1, 28, 28)


def _read(path: Path, columns: list[str], kind: str) -> np.ndarray:
    import pandas as pd

    if path.is_dir():
        raise UserError(f"{path}: is a folder; give the {kind} file itself")
    if not path.is_file():
        raise UserError(f"{path}: file not found ({kind} from Kaggle's Digit Recognizer)")
    header = _check_text(path, kind)
    if not header:
        raise UserError(f"{path}: empty file (expected a {kind} header: "
                        f"{','.join(columns[:3])},...)")
    names = [c.strip().strip('"').strip("'") for c in header.split(",")]  # R quotes them
    _check_header(path, names, columns, kind)
    try:
        # float64 so a missing value is NaN, found below with its line, instead of an error here
        table = pd.read_csv(path, dtype=np.float64, engine="c").to_numpy()
    except pd.errors.ParserError as e:
        raise UserError(f"{path}: {_pandas_detail(e)[:200]} (each row needs {len(columns)} "
                        "values)") from None
    except ValueError:  # a value that is not a number
        raise UserError(_first_non_number(path, len(columns))) from None
    if table.shape[0] == 0:
        raise UserError(f"{path}: no data rows after the header")
    missing = np.isnan(table)
    if missing.any():
        row, col = np.argwhere(missing)[0]
        cells = _row(path, row + 2)
        if len(cells) != len(columns):
            raise UserError(f"{path}: line {row + 2}: {len(cells)} values, expected "
                            f"{len(columns)}")
        cell = cells[col].strip()
        raise UserError(f"{path}: line {row + 2}, column {columns[col]}: " + (
            "empty value" if not cell else f"{cell[:40]!r} is not a number"))
    not_int = table != np.round(table)
    if not_int.any():
        row, col = np.argwhere(not_int)[0]
        raise UserError(f"{path}: line {row + 2}, column {columns[col]}: {table[row, col]} is "
                        "not an integer")
    if columns[0] == "label":
        bad = np.flatnonzero((table[:, 0] < 0) | (table[:, 0] > 9))
        if bad.size:
            raise UserError(f"{path}: line {bad[0] + 2}: label {table[bad[0], 0]:g} is not a "
                            "digit 0-9")
    out = (table < 0) | (table > 255)
    if out.any():
        row, col = np.argwhere(out)[0]
        raise UserError(f"{path}: line {row + 2}, column {columns[col]}: {table[row, col]:g} is "
                        "outside 0-255")
    return table.astype(np.int64)


def _check_text(path: Path, kind: str) -> str:
    """The header line, after checking that the file is comma-separated UTF-8 text: binary
    data, UTF-16 and other separators get their own message, read in bounded chunks (a file of
    NUL bytes is never held in memory)."""
    with path.open("rb") as f:
        first = f.readline(1 << 16).rstrip(b"\r\n")  # Kaggle's header is ~7 kB
        if first.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise UserError(f"{path}: UTF-16 text; save it as UTF-8 (plain CSV)")
        f.seek(0)
        offset = 0
        while chunk := f.read(1 << 20):
            if (at := chunk.find(b"\x00")) >= 0:
                raise UserError(f"{path}: binary data (NUL bytes) at byte {offset + at:,}: not a "
                                f"CSV text file (damaged or truncated?)")
            offset += len(chunk)
    header = first.decode("utf-8", "replace").strip().lstrip("\ufeff")
    if header and "," not in header:
        for sep, name in ((";", "semicolons"), ("\t", "tabs"), (" ", "spaces")):
            if sep in header:
                raise UserError(f"{path}: the header is separated by {name}, not commas; save "
                                f"it as comma-separated {kind}")
    return header


def _check_header(path: Path, got: list[str], want: list[str], kind: str) -> None:
    if got == want:
        return
    if all(_number(c) for c in got):
        raise UserError(f"{path}: the first line is data, not a header: {kind} starts with the "
                        f"line {want[0]},{want[1]},...,{want[-1]} (as Kaggle gives it); put it "
                        "back")
    got_set, want_set = set(got), set(want)
    if kind == "test.csv" and "label" in got_set:
        raise UserError(f"{path}: has a 'label' column: this looks like train.csv, not test.csv")
    if kind == "train.csv" and "label" not in got_set and got_set <= want_set | {"label"}:
        raise UserError(f"{path}: no 'label' column: this looks like test.csv, not train.csv")
    missing = [c for c in want if c not in got_set]
    extra = [c for c in got if c not in want_set]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''} in the header")
    if extra:
        raise UserError(f"{path}: unexpected column(s) {', '.join(extra[:5])} in the header "
                        f"(expected {want[0]},{want[1]},...,{want[-1]})")
    if len(got) != len(want):
        dupes = sorted({c for c in got if got.count(c) > 1})
        raise UserError(f"{path}: duplicated column(s) {', '.join(dupes[:5])} in the header")
    first = next(i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w)
    raise UserError(f"{path}: columns out of order: column {first + 1} is {got[first]!r}, "
                    f"expected {want[first]!r}")


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _pandas_detail(e: Exception) -> str:
    msg = " ".join(str(e).split())
    # "Error tokenizing data. C error: Expected 785 fields in line 3, saw 786"
    return msg.split("C error: ")[-1]


def _row(path: Path, line_no: int) -> list[str]:
    with path.open() as f:
        for i, line in enumerate(f, 1):
            if i == line_no:
                return line.rstrip("\r\n").split(",")
    return []


def _first_non_number(path: Path, width: int) -> str:
    """Slow path, only on error: find the first value that is not a number."""
    with path.open() as f:
        header = next(f).strip().split(",")
        for line_no, line in enumerate(f, 2):
            for col, value in enumerate(line.rstrip("\r\n").split(",")):
                try:
                    float(value)
                except ValueError:
                    name = header[col] if col < len(header) else f"#{col + 1}"
                    shown = repr(value) if len(value) <= 40 else repr(value[:37]) + "..."
                    return f"{path}: line {line_no}, column {name[:40]}: {shown} is not an integer"
    return f"{path}: a value is not a number"
