"""qmoe inside PyTorch and Hugging Face transformers: compressed experts that run from their codes.

Needs torch (and transformers for the Switch Transformers helpers): ``pip install qmoe[torch]``.
``import qmoe`` never imports this module or torch; ``import qmoe.torch`` does.

Modules (inference only: no autograd through the compressed matrices):

* ``CompressedLinear(matrix)`` -- y = x W^T for one ``qmoe.CompressedMatrix`` W (out, in), on any
  leading shape of x. CPU tensors (float32, float16, bfloat16) are handed to qmoe's CPU kernels
  as views of the tensor's memory (the buffer protocol through numpy; no copy), CUDA tensors to
  qmoe's CUDA kernels by device pointer on the current stream (when qmoe was built with them).
* ``CompressedSwitchExperts`` -- a drop-in replacement of transformers'
  ``SwitchTransformersExperts`` (one sparse layer's experts): on the CPU the whole layer runs in
  two grouped kernel calls (``qmoe.CompressedExperts``); ``expert_{i}`` submodules (``.wi``,
  ``.wo``: ``CompressedLinear``) keep transformers' module names.

Model helpers:

* ``from_container(path)`` -- a ``SwitchTransformersForConditionalGeneration`` built from a qmoe
  container without ever decoding an expert to a dense matrix: the model is created on the meta
  device, every expert layer is a ``CompressedSwitchExperts``, and every other parameter is a
  view of the container's memory-mapped tensor (no copy when no dtype conversion is asked for).
  ``model.generate()`` works as for any transformers model.
* ``replace_experts(model, container)`` -- the same replacement in a model already loaded (the
  dense experts are dropped).
* ``collect_hessians(model, batches, path=...)`` -- calibration from PyTorch: forward hooks
  accumulate every expert's wi and wo Hessians from the tokens routed to it, with QMoE's per-expert
  token cap and the C++ calibration's rules (excluded ids such as T5's sentinels, ignored targets,
  no capacity dropping), and write the Hessian file ``qmoe compress --hessians`` reads.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from . import _qmoe as _ext

__all__ = [
    "CompressedLinear",
    "CompressedExpertMLP",
    "CompressedSwitchExperts",
    "from_container",
    "replace_experts",
    "collect_hessians",
    "t5_sentinel_ids",
    "token_batches",
]

_BF16_VIEW = {torch.bfloat16: torch.int16}


def _numpy_view(x: torch.Tensor):
    """A numpy view of a contiguous CPU tensor's memory (no copy) and whether it holds bf16 bits."""
    if x.dtype == torch.float32 or x.dtype == torch.float16:
        return x.numpy(), False
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16), True
    raise TypeError(f"qmoe.torch: expected float32, float16 or bfloat16 activations, got {x.dtype}")


def _torch_dtype_name(dtype: torch.dtype) -> str:
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    if dtype not in names:
        raise TypeError(f"qmoe.torch: expected float32, float16 or bfloat16 activations, got {dtype}")
    return names[dtype]


class CompressedLinear(nn.Module):
    """y = x W^T for a compressed matrix W (out_features, in_features), run from its codes.

    threads: OpenMP threads of the CPU kernels (0: qmoe's default); the result does not depend on
    it. The output has the input's dtype (the kernels accumulate in float32).
    """

    def __init__(self, matrix: "_ext.CompressedMatrix", threads: int = 0):
        super().__init__()
        if not isinstance(matrix, _ext.CompressedMatrix):
            raise TypeError(f"CompressedLinear: expected a qmoe.CompressedMatrix, got {type(matrix).__name__}")
        self.matrix = matrix
        self.out_features, self.in_features = matrix.shape
        self.threads = threads
        self._cuda = {}  # device index -> qmoe.CudaMatrix, made on first use

    def extra_repr(self) -> str:
        m = self.matrix
        return (f"in_features={self.in_features}, out_features={self.out_features}, codec={m.codec}, "
                f"bits_per_weight={m.bits_per_weight:.3f}")

    def cuda_matrix(self, device: int) -> "_ext.CudaMatrix":
        """The matrix on CUDA device `device` (copied there on first use)."""
        cm = self._cuda.get(device)
        if cm is None:
            cm = self.matrix.to_cuda(device)
            self._cuda[device] = cm
        return cm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"CompressedLinear: input has {x.shape[-1]} features, the matrix {self.in_features}")
        if x.requires_grad:
            x = x.detach()
        # The common case -- (tokens, features), contiguous, float32 on the CPU -- with as few
        # tensor operations as possible: one numpy view in, one tensor view out.
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if x2.is_cuda:
            cm = self.cuda_matrix(x2.device.index if x2.device.index is not None else torch.cuda.current_device())
            y = torch.empty((x2.shape[0], self.out_features), dtype=x2.dtype, device=x2.device)
            cm.forward_device(x2.data_ptr(), y.data_ptr(), x2.shape[0], dtype=_torch_dtype_name(x2.dtype),
                              stream=torch.cuda.current_stream(x2.device).cuda_stream)
        elif x2.dtype == torch.float32:
            y = torch.from_numpy(self.matrix.matmul(x2.numpy(), threads=self.threads))
        else:
            arr, bf16 = _numpy_view(x2)
            y = torch.from_numpy(self.matrix.matmul(arr, bf16=bf16, threads=self.threads)).to(x2.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)


class CompressedExpertMLP(nn.Module):
    """One expert, wo(relu(wi(x))), with compressed wi (d_ff, d_model) and wo (d_model, d_ff)."""

    def __init__(self, wi: "_ext.CompressedMatrix", wo: "_ext.CompressedMatrix", threads: int = 0):
        super().__init__()
        self.wi = CompressedLinear(wi, threads)
        self.wo = CompressedLinear(wo, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(torch.relu(self.wi(x)))


class CompressedSwitchExperts(nn.ModuleDict):
    """One Switch sparse layer's experts, compressed: a drop-in replacement of transformers'
    SwitchTransformersExperts, with the same call (hidden_states (n, d_model), selected_experts
    (n, 1, E) one-hot dispatch mask with dropped tokens all-zero, routing_weights (n, 1)) and the
    same result: a routed token's output is its router probability times its expert's output, a
    dropped token's is zero.

    On the CPU the layer runs as one qmoe.CompressedExperts call (both projections of every active
    expert, grouped); on a CUDA device each active expert runs through the CUDA kernels.
    """

    def __init__(self, wi: Sequence["_ext.CompressedMatrix"], wo: Sequence["_ext.CompressedMatrix"],
                 threads: int = 0):
        super().__init__()
        self.num_experts = len(wi)
        self.threads = threads
        self.layer = _ext.CompressedExperts(list(wi), list(wo))
        self.grouped = True  # False: one CompressedExpertMLP call per active expert (as on CUDA)
        for e in range(self.num_experts):
            self[f"expert_{e}"] = CompressedExpertMLP(wi[e], wo[e], threads)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.layer.d_model}, d_ff={self.layer.d_ff}"

    def forward(self, hidden_states: torch.Tensor, selected_experts: torch.Tensor,
                routing_weights: torch.Tensor) -> torch.Tensor:
        if hidden_states.is_cuda or not self.grouped:
            return self._forward_loop(hidden_states, selected_experts, routing_weights)
        x = hidden_states.detach() if hidden_states.requires_grad else hidden_states
        w = routing_weights.detach() if routing_weights.requires_grad else routing_weights
        if (x.dtype == torch.float32 and w.dtype == torch.float32 and x.is_contiguous()
                and w.is_contiguous() and selected_experts.is_contiguous()):
            # The common case, with as few tensor operations as possible: numpy views in (the
            # (n, 1, E) mask and (n, 1) weights as they are), one tensor view out.
            return torch.from_numpy(self.layer.forward(x.numpy(), selected_experts.numpy(), w.numpy(),
                                                       threads=self.threads))
        x = x.contiguous()
        mask = selected_experts.contiguous()
        w = w.float().contiguous()
        if x.dtype == torch.float32:
            return torch.from_numpy(self.layer.forward(x.numpy(), mask.numpy(), w.numpy(), threads=self.threads))
        arr, bf16 = _numpy_view(x)
        y = self.layer.forward(arr, mask.numpy(), w.numpy(), bf16=bf16, threads=self.threads)
        return torch.from_numpy(y).to(hidden_states.dtype)

    def _forward_loop(self, hidden_states, selected_experts, routing_weights):
        """transformers' loop over the active experts, each expert a CompressedExpertMLP."""
        out = torch.zeros_like(hidden_states)
        mask = selected_experts.reshape(hidden_states.shape[0], self.num_experts)
        w = routing_weights.reshape(-1, 1)
        for e in torch.nonzero(mask.sum(dim=0) > 0).flatten().tolist():
            rows = torch.nonzero(mask[:, e]).flatten()
            y = self[f"expert_{e}"](hidden_states[rows]) * w[rows]
            out.index_add_(0, rows, y.to(out.dtype))
        return out


# ---- containers -> transformers models --------------------------------------------------------

_EXPERT = re.compile(r"^(.*\.mlp)\.experts\.expert_(\d+)\.(wi|wo)\.weight$")
_ROUTER = re.compile(r"^(.*\.mlp)\.router\.classifier\.weight$")


def _open(container) -> Mapping[str, Any]:
    if isinstance(container, Mapping):
        return container
    return _ext.load(os.fspath(container))


def _expert_layers(tensors: Mapping[str, Any]) -> dict:
    """{"<prefix>.mlp": (wi list, wo list)} from the compressed expert matrices of a container."""
    found: dict = {}
    for name, value in tensors.items():
        m = _EXPERT.match(name)
        if m and isinstance(value, _ext.CompressedMatrix):
            found.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = value
    layers = {}
    for prefix, mats in found.items():
        num = 1 + max(e for e, _ in mats)
        missing = [f"{prefix}.experts.expert_{e}.{w}.weight" for e in range(num) for w in ("wi", "wo")
                   if (e, w) not in mats]
        if missing:
            raise ValueError(f"container: expert matrices missing: {', '.join(missing[:4])}")
        layers[prefix] = ([mats[(e, "wi")] for e in range(num)], [mats[(e, "wo")] for e in range(num)])
    return layers


def replace_experts(model: nn.Module, container, *, threads: int = 0, strict: bool = True) -> nn.Module:
    """Replaces the experts of every sparse layer of a transformers Switch model by the compressed
    experts of `container` (a path or the dict qmoe.load() returns), named as in the checkpoint
    (``<prefix>.mlp.experts.expert_<e>.{wi,wo}.weight``). The model's dense experts are dropped.

    strict: every sparse layer of the model must have its compressed experts in the container, and
    every compressed expert layer of the container must be a sparse layer of the model (ValueError
    otherwise). Returns the model.
    """
    layers = _expert_layers(_open(container))
    sparse = {name: mod for name, mod in model.named_modules()
              if hasattr(mod, "router") and hasattr(mod, "experts")}
    # Names without a wrapper's prefix: the container names tensors as the checkpoint does.
    by_suffix = {}
    for name in sparse:
        for prefix in layers:
            if name == prefix or name.endswith("." + prefix):
                by_suffix[name] = prefix
    if strict:
        missing = sorted(set(sparse) - set(by_suffix))
        if missing:
            raise ValueError(f"replace_experts: no compressed experts for {', '.join(missing[:4])}")
        unused = sorted(set(layers) - set(by_suffix.values()))
        if unused:
            raise ValueError(f"replace_experts: compressed experts of {', '.join(unused[:4])} match no sparse layer")
    for name, prefix in by_suffix.items():
        mlp = sparse[name]
        wi, wo = layers[prefix]
        num = getattr(mlp.router, "num_experts", len(wi))
        if num != len(wi):
            raise ValueError(f"replace_experts: {name} routes to {num} experts, the container has {len(wi)}")
        mlp.experts = CompressedSwitchExperts(wi, wo, threads)
    return model


def _config_of(path, tensors) -> dict:
    meta = _ext.load_metadata(os.fspath(path))
    if "config.json" in meta:
        return json.loads(meta["config.json"])
    p = os.fspath(path)
    d = p if os.path.isdir(p) else os.path.dirname(p)
    cfg = os.path.join(d, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            return json.load(f)
    raise ValueError(f"{p}: no Switch config (no metadata key 'config.json' and no config.json beside it)")


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor over a (read-only, memory-mapped) numpy array's memory, without a copy."""
    if array.dtype.name == "bfloat16":
        base, dtype = array.view(np.int16), torch.bfloat16
    else:
        base, dtype = array, None
    with warnings.catch_warnings():
        # The container's arrays are read-only views of the mapping; the parameters never change.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(base)
    return t.view(dtype) if dtype is not None else t


def from_container(path: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None,
                   threads: int = 0, config: Optional[Mapping[str, Any]] = None):
    """A transformers SwitchTransformersForConditionalGeneration whose sparse layers run their
    experts from the compressed matrices of the qmoe container `path` (a file, an index .json or
    a directory of shards; the config comes from the container's metadata or a config.json beside
    it, or `config`). No expert is decoded to a dense matrix. The other parameters are read-only
    views of the container's mapped tensors (a copy only when `dtype` asks for another dtype).
    Which blocks are sparse is taken from the tensor names, as the C++ loader does. Untied
    checkpoints embed each stack with its own ``{encoder,decoder}.embed_tokens.weight`` when
    stored, with ``shared.weight`` otherwise. Returns the model in eval mode; its attribute
    ``qmoe_tensors`` is the container's dict of tensors (qmoe.load) the model runs from.
    """
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
    from transformers.models.switch_transformers import modeling_switch_transformers as st

    tensors = _ext.load(os.fspath(path))
    cfg = SwitchTransformersConfig(**(dict(config) if config is not None else _config_of(path, tensors)))
    with torch.device("meta"):
        model = SwitchTransformersForConditionalGeneration(cfg)
    # Sparse blocks from the tensor names (some published configs miscount them).
    routers = {m.group(1) for m in map(_ROUTER.match, tensors) if m}
    for stack_name in ("encoder", "decoder"):
        stack = getattr(model, stack_name)
        for b, block in enumerate(stack.block):
            ff = block.layer[-1]
            prefix = f"{stack_name}.block.{b}.layer.{len(block.layer) - 1}.mlp"
            want_sparse = prefix in routers
            if want_sparse != ff.is_sparse:
                with torch.device("meta"):
                    ff.mlp = st.SwitchTransformersSparseMLP(cfg) if want_sparse else st.SwitchTransformersDenseActDense(cfg)
                ff.is_sparse = block.is_sparse = want_sparse
    replace_experts(model, tensors, threads=threads)

    def source(name):
        if name in tensors and not isinstance(tensors[name], _ext.CompressedMatrix):
            return name
        if name.endswith("embed_tokens.weight") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            return "shared.weight"  # tied, or untied without an embedding of its own
        raise ValueError(f"{os.fspath(path)}: tensor '{name}' is missing")

    made = {}
    for name, _ in list(model.named_parameters(remove_duplicate=False)):
        key = source(name)
        if cfg.tie_word_embeddings and (name.endswith("embed_tokens.weight") or name == "lm_head.weight"):
            key = "shared.weight"
        if key not in made:
            t = _as_tensor(tensors[key])
            if dtype is not None and t.dtype != dtype:
                t = t.to(dtype)
            made[key] = nn.Parameter(t, requires_grad=False)
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        want = tuple(mod._parameters[leaf].shape)
        if tuple(made[key].shape) != want:
            raise ValueError(f"{os.fspath(path)}: tensor '{key}' has shape {tuple(made[key].shape)}, "
                             f"'{name}' needs {want}")
        mod._parameters[leaf] = made[key]
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ValueError(f"{os.fspath(path)}: no tensor for {', '.join(left[:4])}")
    model.eval()
    model.requires_grad_(False)
    model.qmoe_tensors = tensors  # the container's tensors (qmoe.load), whose mapping the model uses
    return model


# ---- calibration --------------------------------------------------------------------------------

def t5_sentinel_ids(count: int = 100) -> list:
    """The ids of T5's sentinels <extra_id_0> ... <extra_id_{count-1}> (32099 down to
    32100 - count), as the C++ calibration's t5_sentinel_ids()."""
    if not 0 <= count <= 100:
        raise ValueError("t5_sentinel_ids: count must be in [0, 100]")
    return sorted(32099 - i for i in range(count))


def token_batches(path: Union[str, os.PathLike], batch_pairs: int = 8, pad_token_id: int = 0):
    """The pairs of a qmoe token file (format/TOKENS.md) as transformers batches: dicts of
    input_ids, attention_mask, labels and decoder_attention_mask (int64 tensors, sequences padded
    on the right; padded labels are -100 and masked out), `batch_pairs` pairs each, in file order.
    """
    from safetensors.numpy import load_file

    t = load_file(os.fspath(path))
    enc, eoff = t["encoder_ids"], t["encoder_offsets"]
    dec, doff = t["decoder_targets"], t["decoder_offsets"]
    pairs = len(eoff) - 1
    out = []
    for p0 in range(0, pairs, batch_pairs):
        ps = range(p0, min(pairs, p0 + batch_pairs))
        el = max(int(eoff[p + 1] - eoff[p]) for p in ps)
        dl = max(int(doff[p + 1] - doff[p]) for p in ps)
        ids = torch.full((len(ps), el), pad_token_id, dtype=torch.int64)
        am = torch.zeros((len(ps), el), dtype=torch.int64)
        labels = torch.full((len(ps), max(dl, 1)), -100, dtype=torch.int64)
        dm = torch.zeros((len(ps), max(dl, 1)), dtype=torch.int64)
        for i, p in enumerate(ps):
            e = torch.from_numpy(enc[eoff[p]:eoff[p + 1]].astype(np.int64))
            d = torch.from_numpy(dec[doff[p]:doff[p + 1]].astype(np.int64))
            ids[i, :len(e)] = e
            am[i, :len(e)] = 1
            labels[i, :len(d)] = d
            dm[i, :len(d)] = 1
        out.append({"input_ids": ids, "attention_mask": am, "labels": labels, "decoder_attention_mask": dm})
    return out


def _shift_right(labels: torch.Tensor, start: int, pad: int) -> torch.Tensor:
    out = labels.new_zeros(labels.shape)
    out[:, 1:] = labels[:, :-1]
    out[:, 0] = start
    return out.masked_fill(out == -100, pad)


def collect_hessians(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], path=None, *,
                     token_cap_multiplier: float = 4.0, excluded_ids: Sequence[int] = (),
                     exclude_ignored_targets: bool = True, expert_capacity: Optional[int] = None) -> dict:
    """Hessians of every expert matrix of a transformers Switch model from calibration batches,
    through forward hooks on the model's sparse layers, in one pass through the model as it is
    (QMoE's statistics; what ``qmoe compress --calib-tokens --calib-independent`` and
    qmoe.calibration_hessians() compute with the C++ forward pass).

    batches: dicts with input_ids (B, S), optionally attention_mask, and labels (B, T) or
    decoder_input_ids (B, T), optionally decoder_attention_mask; e.g. token_batches(). Padding
    (mask 0) never counts. For expert e of a sparse layer, wi's inputs are the layer-normed FF
    inputs of the tokens routed to e, wo's the inputs its wo receives (relu(wi x)); a token does
    not count when its input id is in excluded_ids (e.g. t5_sentinel_ids()), when it is a decoder
    position whose label is -100 (exclude_ignored_targets), or when it was dropped over the expert
    capacity. expert_capacity: None (default) routes every token, as QMoE's calibration does (the
    routers' capacity is lifted during the pass and restored); an int applies that capacity.
    Each accumulator keeps the first floor(token_cap_multiplier * T / E) tokens (T: the unpadded
    tokens of the layer's stack over all batches, E: experts; 0: no cap), in batch order, then
    row order.

    Returns dict of name (the weight's name without ".weight", e.g.
    "encoder.block.1.layer.1.mlp.experts.expert_0.wi") -> qmoe.HessianAccumulator, and writes them
    to `path` (qmoe.save_hessians: format/HESSIANS.md) when given.
    """
    batches = list(batches)
    cfg = model.config
    start = cfg.decoder_start_token_id
    pad = cfg.pad_token_id

    def stack_views(batch):
        ids = batch["input_ids"]
        emask = batch.get("attention_mask")
        emask = torch.ones_like(ids) if emask is None else emask
        if batch.get("decoder_input_ids") is not None:
            dids = batch["decoder_input_ids"]
            labels = batch.get("labels")
        else:
            labels = batch["labels"]
            dids = _shift_right(labels, start, pad)
        dmask = batch.get("decoder_attention_mask")
        dmask = torch.ones_like(dids) if dmask is None else dmask
        enc_valid = emask.bool()
        dec_total = dmask.bool()
        dec_valid = dec_total.clone()
        if exclude_ignored_targets and labels is not None:
            dec_valid &= labels != -100
        if excluded_ids:
            ex = torch.tensor(sorted(set(int(i) for i in excluded_ids)), dtype=ids.dtype)
            enc_valid &= ~torch.isin(ids, ex)
            dec_valid &= ~torch.isin(dids, ex)
        return {"encoder": (enc_valid, int(emask.bool().sum())), "decoder": (dec_valid, int(dec_total.sum()))}

    views = [stack_views(b) for b in batches]
    totals = {s: sum(v[s][1] for v in views) for s in ("encoder", "decoder")}

    layers = []
    for name, mod in model.named_modules():
        if hasattr(mod, "router") and hasattr(mod, "experts"):
            stack = "decoder" if re.search(r"(^|\.)decoder\.", name + ".") else "encoder"
            m = re.search(r"((?:encoder|decoder)\.block\.\d+\.layer\.\d+\.mlp)$", name)
            if not m:
                raise ValueError(f"collect_hessians: cannot name the experts of module {name}")
            layers.append((m.group(1), stack, mod))
    if not layers:
        raise ValueError("collect_hessians: the model has no sparse (router + experts) layer")

    accs, handles, state, grouped = {}, [], {}, []
    saved_capacity = []
    try:
        for prefix, stack, mlp in layers:
            num = mlp.router.num_experts
            total = totals[stack]
            cap = _ext.expert_token_cap(total, num, token_cap_multiplier) if token_cap_multiplier > 0 and total > 0 else 0
            saved_capacity.append((mlp.router, mlp.router.expert_capacity))
            if isinstance(mlp.experts, CompressedSwitchExperts):
                grouped.append(mlp.experts)  # per-expert modules, so that the hooks see them
                mlp.experts.grouped = False
            if expert_capacity is None:
                mlp.router.expert_capacity = 1 << 62
            elif expert_capacity > 0:
                mlp.router.expert_capacity = int(expert_capacity)
            counted = {}

            def router_hook(_mod, _inp, out, stack=stack, counted=counted, num=num):
                # out[0]: (B, S, E) one-hot dispatch mask, dropped tokens all-zero.
                dispatch = out[0].reshape(-1, num).bool()
                valid = state[stack].reshape(-1)
                for e in range(num):
                    routed = dispatch[:, e]
                    counted[e] = valid[routed]  # over the expert's rows, in row order

            handles.append(mlp.router.register_forward_hook(router_hook))
            for e in range(num):
                expert = mlp.experts[f"expert_{e}"]
                for which in ("wi", "wo"):
                    lin = getattr(expert, which)
                    acc = _ext.HessianAccumulator(lin.in_features, token_cap=cap)
                    accs[f"{prefix}.experts.expert_{e}.{which}"] = acc

                    def pre_hook(_mod, inp, acc=acc, e=e, counted=counted):
                        x = inp[0].detach()
                        keep = counted[e]
                        if keep.shape[0] != x.shape[0]:
                            raise RuntimeError("collect_hessians: an expert saw other tokens than its router sent it")
                        x = x[keep]
                        if x.shape[0]:
                            acc.add(x.float().cpu().numpy())

                    handles.append(lin.register_forward_pre_hook(pre_hook))
        with torch.no_grad():
            for batch, view in zip(batches, views):
                state["encoder"] = view["encoder"][0]
                state["decoder"] = view["decoder"][0]
                kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids",
                                                "decoder_attention_mask") if batch.get(k) is not None}
                if "decoder_input_ids" not in kwargs:
                    kwargs["decoder_input_ids"] = _shift_right(batch["labels"], start, pad)
                model(**kwargs)
    finally:
        for h in handles:
            h.remove()
        for router, capacity in saved_capacity:
            router.expert_capacity = capacity
        for experts in grouped:
            experts.grouped = True
    if path is not None:
        _ext.save_hessians(os.fspath(path), accs)
    return accs
