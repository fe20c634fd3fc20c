"""What a lint says about one place in a bundle (every target's lint reports these)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Finding:
    stage: str
    node: str
    op: str
    severity: str  # "error" | "warning"
    message: str

    def __str__(self) -> str:
        where = f"{self.node} ({self.op})" if self.op else (self.node or "graph")
        return f"{self.severity}: {self.stage}: {where}: {self.message}"
