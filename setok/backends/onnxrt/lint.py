"""`setok lint --target onnxruntime-cpu`: every op of a stage has an ONNX Runtime CPU kernel (the
installed ONNX Runtime's own kernel registry says which), and the quantized forms suit that target."""

from __future__ import annotations

import onnx

from setok.backends.findings import Finding


def ort_cpu_kernels() -> set[tuple[str, str]]:
    """(domain, op) pairs the installed ONNX Runtime has a CPU kernel for."""
    from onnxruntime.capi import _pybind_state as C

    return {(k.domain, k.op_name) for k in C.get_all_opkernel_def() if k.provider == "CPUExecutionProvider"}


def lint_ort_cpu(model: onnx.ModelProto, stage: str, quantized_for: str | None = None) -> list[Finding]:
    """ONNX Runtime CPU: every op has a CPU kernel (or is an ONNX function / Constant, which ORT
    expands); a custom op needs its library; a TensorRT weight-only form is noted (it runs, fused)."""
    kernels = ort_cpu_kernels()
    findings, seen = [], set()
    for node in model.graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        key = (domain, node.op_type)
        if key in seen or key in kernels or node.op_type == "Constant":
            continue
        seen.add(key)
        if domain == "" and onnx.defs.has(node.op_type) and onnx.defs.get_schema(node.op_type).has_function:
            continue
        name = f"{domain}::{node.op_type}" if domain else node.op_type
        if domain in ("", "com.microsoft"):
            findings.append(Finding(stage, node.name, node.op_type, "error", f"{name} has no ONNX Runtime CPU kernel"))
        else:
            findings.append(Finding(stage, node.name, node.op_type, "warning", f"custom op {name}: ONNX Runtime needs its "
                                    "custom-op library (the runtime registers the bundle's own)"))
    int4 = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "block_size" and a.i for a in n.attribute)]
    if int4:
        findings.append(Finding(stage, int4[0].name, "DequantizeLinear", "warning", f"{len(int4)} blocked DequantizeLinear -> "
                                "MatMul (the TensorRT weight-only form): ONNX Runtime CPU fuses them into MatMulNBits; "
                                "`setok calibrate --target onnxruntime-cpu` writes MatMulNBits directly"))
    if quantized_for not in (None, "onnxruntime-cpu"):
        findings.append(Finding(stage, "", "", "warning", f"quantized for {quantized_for}, not ONNX Runtime CPU: its "
                                "stages kept Q/DQ without the CPU speed gate"))
    return findings
