"""CPU options without native bf16 (``python -m benchmarks --only cpu-options``): the fp32 eager model against
torch.compile, torch's dynamic int8, ONNX Runtime (fp32, dynamic int8), OpenVINO fp32 and OpenVINO static int8
calibrated by NNCF, on the same images in one run.

The model is the real DINOv2 ViT-S/14 of the test suite (``tests/onnx_dinov2.py``) at 224 x 224 with
``crop``. Every option computes the stored components (the CLS of the last 4 blocks, the mean and GeM patch
tokens) of fixed-size batches; speed is the model alone, at the default CPU batch size, 2 threads. Agreement:
the smallest cosine between an option's features and fp32's, over the strategies simple, complex and gem, on
real photos and their edited copies; copy detection: recall@1 of the edited copies against the originals with
``complex`` (DINO's linear-evaluation features, as ``tests/test_real_weights.py``). Static int8 is calibrated
on images the evaluation does not use (other scikit-image samples and synthetic banners).
"""

from __future__ import annotations

import copy
import io
import statistics
import time
from pathlib import Path

import numpy as np
import torch

STRATEGIES = ("simple", "complex", "gem")
CALIBRATION_SAMPLES = ("brick", "grass", "gravel", "moon", "page", "text", "clock", "colorwheel", "logo", "cell")
THREADS = 2
AGREEMENT = 0.99  # the smallest cosine to fp32's features an option must keep, on every strategy (issue #15)
SGEMM = 2048  # the square fp32 matrix product that measures the CPU's peak as torch reaches it


class ComponentsModule(torch.nn.Module):
    """A backbone and its pooling as one module with tensor outputs ``(cls, mean, gem)``, for the exporters."""

    def __init__(self, backbone, n_last: int):
        super().__init__()
        self.backbone, self.n_last = backbone, n_last

    def forward(self, x):
        from bannermatch.pooling import pool_components

        parts = pool_components(self.backbone(x, self.n_last), self.backbone.pool_norm)
        return parts["cls"], parts["mean"], parts["gem"]


def fixed_size(backbone, recipe):
    """A copy of a timm DINO/DINOv2 backbone whose position grid is already resized to the recipe's input, so
    the exporters, which trace one input size, see no resize with traced sizes."""
    model = copy.deepcopy(backbone)
    vit = model.model
    height, width = (s // backbone.spec.patch_size for s in recipe.input_size())
    kept = 0 if vit.no_embed_class else vit.num_prefix_tokens
    with torch.no_grad():  # the embedding of zero patches is the resized grid (after the prefix tokens)
        tokens = vit._pos_embed(torch.zeros(1, height, width, backbone.embed_dim))
        grid = tokens[:, vit.num_prefix_tokens:]
        vit.pos_embed = torch.nn.Parameter(torch.cat([vit.pos_embed[:, :kept], grid], dim=1))
    return model


def _as_parts(outputs) -> dict[str, np.ndarray]:
    return {name: np.asarray(value) for name, value in zip(("cls", "mean", "gem"), outputs)}


def evaluation_images(recipe) -> tuple[torch.Tensor, int]:
    """Real photos (originals first) then their edited copies (``tests/test_real_weights.py``'s edits, through
    JPEG quality 95 as that test stores them), preprocessed as extraction does; and the number of originals."""
    from benchmarks.run import _tests_module
    from bannermatch.extraction import Preprocess
    from bannermatch.sources import decode_image

    originals = _tests_module("real_photos").photos()
    edits = _tests_module("test_real_weights")._edits
    transform = Preprocess(recipe)
    images = list(originals)
    for e in range(6):
        for img in originals:
            buf = io.BytesIO()
            edits(img)[e].save(buf, "JPEG", quality=95)
            images.append(decode_image(buf.getvalue()))
    return torch.stack([transform(img.convert("RGB")) for img in images]), len(originals)


def calibration_images(recipe, n: int) -> torch.Tensor:
    """Images the evaluation does not see: scikit-image's other samples (textures, text, a clock) and
    synthetic banners."""
    import skimage.data
    from PIL import Image

    from benchmarks.run import _draw_banner
    from bannermatch.extraction import Preprocess

    transform = Preprocess(recipe)
    images = [Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB") for name in CALIBRATION_SAMPLES]
    draw = _draw_banner()
    images += [draw(1000 + i) for i in range(max(0, n - len(images)))]
    return torch.stack([transform(img) for img in images[:n]])


def _batches(x: torch.Tensor, batch: int):
    """Fixed-size batches (the last padded with zeros): every backend runs one input shape."""
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        n = len(chunk)
        if n < batch:
            chunk = torch.cat([chunk, chunk.new_zeros(batch - n, *chunk.shape[1:])])
        yield chunk, n


def quantize_linear_layers(backbone, per_channel: bool, keep_fc2: bool):
    """A copy of ``backbone`` with torch's dynamic int8 linear layers: per-tensor or per-output-channel weight
    scales; ``keep_fc2`` leaves the MLPs' second layers in fp32 (their inputs, after GELU, carry the outliers
    that per-tensor activation scales handle worst)."""
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    layers = {name: qconfig for name, module in backbone.named_modules()
              if isinstance(module, torch.nn.Linear) and not (keep_fc2 and name.endswith("mlp.fc2"))}
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(backbone), layers, dtype=torch.qint8)


def build_options(backbone, recipe, batch: int, tmp: Path, calibration: torch.Tensor) -> dict:
    """name -> function(batch tensor) -> components as numpy. Options whose package is missing are left out
    with a note on stderr."""
    import sys

    from bannermatch.extraction import CompiledEmbedder, compute_components
    from bannermatch.recipe import STORED_BLOCKS

    n_last = min(STORED_BLOCKS, backbone.depth)
    module = ComponentsModule(fixed_size(backbone, recipe), n_last).eval()
    example = torch.zeros(batch, 3, *recipe.input_size())
    options = {"torch fp32 eager": lambda x: {k: v.numpy() for k, v in compute_components(backbone, x, recipe).items()}}

    compiled = CompiledEmbedder(backbone, recipe, batch)
    start = time.perf_counter()
    compiled(example)
    print(f"  [cpu-options] torch.compile: the first batch took {time.perf_counter() - start:.1f} s", file=sys.stderr)
    options["torch.compile (inductor, frozen)"] = lambda x: {k: v.numpy() for k, v in compiled(x).items()}

    for name, per_channel, keep_fc2 in (("torch quantize_dynamic int8 (nn.Linear)", False, False),
                                        ("torch quantize_dynamic int8, per-channel weights", True, False),
                                        ("torch quantize_dynamic int8, per-channel, fc2 in fp32", True, True)):
        quantized = quantize_linear_layers(backbone, per_channel, keep_fc2)
        options[name] = lambda x, q=quantized: {k: v.numpy() for k, v in compute_components(q, x, recipe).items()}

    onnx_file = tmp / "dinov2_vits14.onnx"
    with torch.inference_mode():
        torch.onnx.export(module, (example,), str(onnx_file), dynamo=False, input_names=["x"],
                          output_names=["cls", "mean", "gem"])
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        int8_file = tmp / "dinov2_vits14_int8.onnx"
        quantize_dynamic(str(onnx_file), str(int8_file), weight_type=QuantType.QInt8)
        for name, file in (("ONNX Runtime fp32", onnx_file), ("ONNX Runtime dynamic int8", int8_file)):
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
            session = ort.InferenceSession(str(file), so, providers=["CPUExecutionProvider"])
            options[name] = lambda x, s=session: _as_parts(s.run(None, {"x": x.numpy()}))
    except ImportError as exc:
        print(f"  [cpu-options] ONNX Runtime left out: {exc}", file=sys.stderr)
    try:
        import nncf
        import openvino as ov

        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": THREADS, "INFERENCE_PRECISION_HINT": "f32"}
        with torch.inference_mode():
            ov_model = ov.convert_model(module, example_input=example)
        ov_model.reshape({0: list(example.shape)})
        fp32 = core.compile_model(ov_model, "CPU", config)
        options["OpenVINO fp32 (LATENCY hint)"] = lambda x, m=fp32: _as_parts(m(x.numpy()).values())
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

        dataset = nncf.Dataset([c.numpy() for c, _ in _batches(calibration, batch)])
        no_smooth_quant = AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
        fc2 = nncf.IgnoredScope(patterns=[r".*\.mlp\.fc2/.*"], validate=False)
        for name, extra in (("OpenVINO static int8 (NNCF, calibrated)", {}),
                            ("OpenVINO static int8, no SmoothQuant", {"advanced_parameters": no_smooth_quant}),
                            ("OpenVINO static int8, no SmoothQuant, fc2 in fp32",
                             {"advanced_parameters": no_smooth_quant, "ignored_scope": fc2})):
            start = time.perf_counter()
            int8_model = nncf.quantize(ov_model, dataset, model_type=nncf.ModelType.TRANSFORMER,
                                       subset_size=-(-len(calibration) // batch), **extra)
            print(f"  [cpu-options] {name}: calibration took {time.perf_counter() - start:.1f} s", file=sys.stderr)
            int8 = core.compile_model(int8_model, "CPU", config)
            options[name] = lambda x, m=int8: _as_parts(m(x.numpy()).values())
    except ImportError as exc:
        print(f"  [cpu-options] OpenVINO left out: {exc}", file=sys.stderr)
    return options


def model_flops(backbone, recipe) -> float:
    """Floating-point operations of one image's forward pass (matrix products counted as 2*M*N*K), counted through
    the plain attention: the counter does not see the fused kernel's products on a CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.run import _with_attention
    from bannermatch.extraction import compute_components

    def count() -> float:
        with FlopCounterMode(display=False) as counter:
            compute_components(backbone, torch.zeros(1, 3, *recipe.input_size()), recipe)
        return counter.get_total_flops()

    return _with_attention(backbone, False, count)


def bench_cpu_options(args, tmp: Path) -> dict:
    from benchmarks.run import _interleaved, _tests_module
    from bannermatch.extraction import load_backbone
    from bannermatch.pooling import view
    from bannermatch.recipe import default_batch_size, make_recipe

    torch.set_num_threads(THREADS)
    weights = tmp / "dinov2_vits14_pretrain.pth"
    torch.save(_tests_module("onnx_dinov2").convert(), weights)
    recipes = {s: make_recipe("dinov2_vits14", strategy=s, weights=weights) for s in STRATEGIES}
    recipe = recipes["simple"]
    backbone = load_backbone(recipe, weights, "cpu").eval()
    batch = args.batch_size or default_batch_size(recipe, "cpu")
    images, n_originals = evaluation_images(recipe)
    options = build_options(backbone, recipe, batch, tmp, calibration_images(recipe, args.calibration_images))

    features = {}
    for name, fn in options.items():  # every option on the same images
        parts = [fn(x) for x, _ in _batches(images, batch)]
        parts = {k: np.concatenate([p[k] for p in parts])[:len(images)] for k in ("cls", "mean", "gem")}
        features[name] = {s: view(parts, r).numpy() for s, r in recipes.items()}
    reference = features["torch fp32 eager"]

    timing = images[:batch].repeat((args.cpu_images + batch - 1) // batch, 1, 1, 1)[:args.cpu_images]
    runs = {name: (len(timing), lambda fn=fn: [fn(x) for x, _ in _batches(timing, batch)]) for name, fn in options.items()}
    a, b = torch.randn(SGEMM, SGEMM), torch.randn(SGEMM, SGEMM)
    runs[f"sgemm {SGEMM}^3 x10 (the fp32 peak)"] = (10, lambda: [a @ b for _ in range(10)])  # same load as the options
    rates = _interleaved(runs, args.repeats, "cpu-options")
    sgemm = max(rates.pop(f"sgemm {SGEMM}^3 x10 (the fp32 peak)")) * 2 * SGEMM ** 3 / 1e9

    rows = []
    for name in options:
        cos = {s: float(np.sum(features[name][s] * reference[s], axis=1).min()) for s in STRATEGIES}
        f = features[name]["complex"]
        originals, copies = f[:n_originals], f[n_originals:]
        truth = np.tile(np.arange(n_originals), len(copies) // n_originals)
        recall = float(np.mean(np.argmax(copies @ originals.T, axis=1) == truth))
        rows.append({"option": name, "best": max(rates[name]), "median": statistics.median(rates[name]),
                     "cos": cos, "mean_cos": float(np.sum(f * reference["complex"], axis=1).mean()),
                     "recall": recall})
    return {"rows": rows, "batch": batch, "images": len(images), "copies": len(images) - n_originals,
            "flops": model_flops(backbone, recipe), "sgemm": sgemm}


def print_cpu_options(r: dict) -> None:
    print(f"\n## CPU options without native bf16: DINOv2 ViT-S/14 (real weights), 224 x 224, model only, "
          f"batch {r['batch']}, {THREADS} threads\n")
    print(f"Agreement on {r['images']} real photos and edited copies: the smallest cosine to fp32's features, per "
          f"strategy; recall@1 of the {r['copies']} copies (complex). {r['flops'] / 1e9:.2f} GFLOP per image; a plain "
          f"fp32 sgemm ({SGEMM}^3, interleaved with the options) reaches {r['sgemm']:.0f} GFLOP/s here: the share of "
          "peak is each option's rate in fp32 FLOP against it.\n")
    print("| option | best img/s | median img/s | vs fp32 eager | " + " | ".join(f"min cos {s}" for s in STRATEGIES)
          + " | mean cos complex | recall@1 | share of sgemm peak |")
    print("|---|---:|---:|---:|" + "---:|" * len(STRATEGIES) + "---:|---:|---:|")
    base = next(x["best"] for x in r["rows"] if x["option"] == "torch fp32 eager")
    for x in r["rows"]:
        print(f"| {x['option']} | {x['best']:.1f} | {x['median']:.1f} | {x['best'] / base:.2f}x | "
              + " | ".join(f"{x['cos'][s]:.4f}" for s in STRATEGIES)
              + f" | {x['mean_cos']:.4f} | {x['recall']:.3f} | {x['best'] * r['flops'] / 1e9 / r['sgemm']:.0%} |")
    kept = [x for x in r["rows"] if min(x["cos"].values()) >= AGREEMENT]
    best = max(kept, key=lambda x: x["median"])
    print(f"\nFastest option whose features stay within cos {AGREEMENT} of fp32 (by median): {best['option']}, "
          f"{best['median'] / next(x['median'] for x in r['rows'] if x['option'] == 'torch fp32 eager'):.2f}x "
          f"fp32 eager; the fastest of all: {max(r['rows'], key=lambda x: x['median'])['option']}.")
