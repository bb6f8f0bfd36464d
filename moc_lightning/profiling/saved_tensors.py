"""Measured activation memory: the bytes autograd saves for backward, counted through
`torch.autograd.graph.saved_tensors_hooks`.

Each storage is counted once (a tensor saved by two ops, or two views of one buffer, cost one
buffer), at its full size (a saved view keeps its whole buffer alive). Parameters, and the copies
autocast makes of them, are weights rather than activations and are left out. Bytes are
attributed to the innermost registered module running when the tensor was saved.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import nn


@dataclass
class SavedBytes:
    total: int = 0
    by_scope: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    tensors: int = 0

    def by_category(self, categorize: Callable[[str], str]) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for scope, nbytes in self.by_scope.items():
            out[categorize(scope)] += nbytes
        return dict(out)


def _storage_key(t: torch.Tensor):
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage (e.g. nested)
        return None, t.numel() * t.element_size()
    return (t.device, storage.data_ptr()), storage.nbytes()


class SavedTensorRecorder:
    """Context manager recording the bytes saved for backward inside it.

    scopes: module name -> module; bytes saved while a module runs go to its name (the innermost
    one when they nest), the rest to "other".
    """

    def __init__(self, params: Iterable[torch.Tensor] = (), scopes: Optional[dict[str, nn.Module]] = None):
        self.params = list(params)
        self.scopes = scopes or {}
        self.result = SavedBytes()
        self._stack: list[str] = []
        self._seen: set = set()
        self._handles: list = []

    def _is_weight(self, t: torch.Tensor) -> bool:
        key, _ = _storage_key(t)
        if key in self._param_keys:
            return True
        # An autocast copy of a parameter (or a view of one): a cast whose input is the parameter.
        fn = (t._base if t._base is not None else t).grad_fn
        if fn is not None and fn.name().startswith("ToCopyBackward"):
            source = fn.next_functions[0][0] if fn.next_functions else None
            variable = getattr(source, "variable", None)
            return variable is not None and _storage_key(variable)[0] in self._param_keys
        return False

    def _pack(self, t: torch.Tensor):
        if not self._is_weight(t):
            key, nbytes = _storage_key(t)
            if key is None or key not in self._seen:
                if key is not None:
                    self._seen.add(key)
                scope = self._stack[-1] if self._stack else "other"
                self.result.by_scope[scope] += nbytes
                self.result.total += nbytes
                self.result.tensors += 1
        return t

    def _enter_scope(self, name: str):
        def hook(module, args):
            self._stack.append(name)  # a hook returning a value would replace the module's input

        return hook

    def _leave_scope(self, module, args, out):
        self._stack.pop()  # returns None: a value would replace the module's output

    def __enter__(self) -> "SavedTensorRecorder":
        self._param_keys = {_storage_key(p)[0] for p in self.params}
        for name, module in self.scopes.items():
            self._handles.append(module.register_forward_pre_hook(self._enter_scope(name)))
            self._handles.append(module.register_forward_hook(self._leave_scope))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False


def measure_saved_bytes(module: nn.Module, *inputs, scopes: Optional[dict[str, nn.Module]] = None, **kwargs) -> SavedBytes:
    """Run one forward pass of `module` with gradients on and return what it saved for backward."""
    with torch.enable_grad(), SavedTensorRecorder(module.parameters(), scopes) as recorder:
        out = module(*inputs, **kwargs)
    del out  # frees the graph and everything it saved
    return recorder.result


MODEL_CATEGORIES = {
    "embed_tokens": "embedding",
    "self_attn": "attention",
    "mlp": "ffn",
    "input_layernorm": "rmsnorm",
    "post_attention_layernorm": "rmsnorm",
    "norm": "rmsnorm",
    "lm_head": "lm_head",
}


def model_scopes(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of a MoCTransformer whose saved bytes are told apart (HF LLaMA names)."""
    return {name: m for name, m in model.named_modules() if name.split(".")[-1] in MODEL_CATEGORIES}


def model_category(scope: str) -> str:
    return MODEL_CATEGORIES.get(scope.split(".")[-1], "other")


def measure_model_saved_bytes(model: nn.Module, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> dict[str, int]:
    """Saved bytes of one forward pass of a MoCTransformer by category (attention, ffn, ...)."""
    saved = measure_saved_bytes(model, input_ids, labels=labels, scopes=model_scopes(model))
    out = saved.by_category(model_category)
    out["total"] = saved.total
    return out
