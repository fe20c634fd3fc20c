"""Producer / consumer lookups over one ONNX GraphProto, shared by the llm graph's rewrites
(attention.py, pack.py, norms.py)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np


class Graph:
    def __init__(self, g):
        self.g = g
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers = defaultdict(list)
        for n in g.node:
            for x in n.input:
                self.consumers[x].append(n)
        self.consts = {t.name: t for t in g.initializer}

    def const(self, name: str) -> np.ndarray | None:
        """The value of an inline initializer or a Constant node's output, else None."""
        import onnx

        if name in self.consts and not self.consts[name].external_data:
            return onnx.numpy_helper.to_array(self.consts[name])
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            return onnx.numpy_helper.to_array(n.attribute[0].t)
        return None

    def only(self, name: str, op: str):
        """The single reader of `name` when it is an `op` node, else None."""
        users = self.consumers[name]
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def through_identity(self, name: str) -> str:
        """The tensor behind Identity nodes: the exporter writes one per deduplicated (equal) constant,
        e.g. a fresh model's zero biases or unit norm weights sharing one initializer."""
        n = self.producer.get(name)
        while n is not None and n.op_type == "Identity":
            name, n = n.input[0], self.producer.get(n.input[0])
        return name
