"""Progress display: tqdm when it is installed (the ``progress`` extra), else one line on stderr redrawn in
place; nothing at all when disabled."""
from __future__ import annotations

import sys
import time
from typing import Any


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


class Progress:
    """A progress bar of ``total`` units (``"B"``: bytes, shown scaled; ``"%"``: a percentage).

    ``update_to(n)`` moves it to ``n``; ``note(text)`` sets the text after it; ``close()`` ends the line."""

    def __init__(self, total: float | None, desc: str, unit: str = "B", enabled: bool = True):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.n = 0.0
        self.text = ""
        self._bar: Any = None
        self._drawn_at = 0.0
        self._width = 0
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            scaled = unit == "B"
            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=scaled, unit_divisor=1024 if scaled else 1,
                             leave=True, dynamic_ncols=True,
                             bar_format=None if scaled else "{l_bar}{bar}| [{elapsed}<{remaining}]{postfix}")

    def update_to(self, n: float) -> None:
        if not self.enabled:
            return
        self.n = n = max(0.0, min(n, self.total)) if self.total else max(0.0, n)
        if self._bar is not None:
            self._bar.update(n - self._bar.n)
        else:
            self._draw()

    def note(self, text: str) -> None:
        if not self.enabled or text == self.text:
            return
        self.text = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)
        else:
            self._draw(force=True)

    def _draw(self, force: bool = False, final: bool = False) -> None:
        now = time.monotonic()
        if not (force or final) and now - self._drawn_at < 0.5:
            return
        self._drawn_at = now
        if self.unit == "B":
            amount = _size(self.n) + (f" of {_size(self.total)}" if self.total else "")
            if self.total:
                amount += f" ({100 * self.n / self.total:.0f}%)"
        else:
            amount = f"{self.n:.0f}%"
        line = f"{self.desc}: {amount}" + (f", {self.text}" if self.text else "")
        pad = max(0, self._width - len(line))
        self._width = len(line)
        sys.stderr.write("\r" + line + " " * pad + ("\n" if final else ""))
        sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            self._draw(final=True)
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
