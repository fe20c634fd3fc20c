"""TensorRT / Triton plugin for the cluster stage (DPC-KNN).

Submodules are imported on demand; none of them loads tensorrt, triton or CUDA at package
import. cluster_kernels (Triton kernels + dpc_knn_triton), compile (PTX/cubin without a GPU),
trt_plugin (tensorrt.plugin registration of the cluster op, setok.manifest.CLUSTER_OP).
"""
