"""Future-attention tables for the eviction oracle (:mod:`kvbound.policies.oracle`).

One forward pass of the full model over the windows; a capturing attention function (SDPA for
the output, so the pass computes exactly what the model does) reduces each evicted layer's
attention to the future attention mass of every key at decision times ``0, stride, 2 stride, ...``
with :func:`kvbound.train.rank_loss.future_attention`, the attention-rank objective's target.
Memory: (B, H_kv, T / stride + 1, T) fp32 per evicted layer (SmolLM2, 1K tokens, stride 16:
24 MB per window); the (T x T) attention of one layer is transient.
"""

from __future__ import annotations

import torch

from kvbound.architectures import attention_modules, evicted_layers
from kvbound.errors import KVBoundError, check_int
from kvbound.policies.oracle import FittedRetentionOracle, FutureAttentionOracle

#: what :func:`fit_retention` fits: the TRIM-KV form ``(t - i) log beta_i``, or with an offset
FITS = ("trimkv", "trimkv+offset")

CAPTURE_NAME = "kvbound_capture"


def decision_times(j: int, stride: int, t: int, device=None) -> torch.Tensor:
    """(J,) the decision times of a future-attention table: ``0, stride, 2 stride, ...``, the
    last ones clamped to the text's length ``t`` (:func:`future_attention_tables`)."""
    return torch.arange(0, j * stride, stride, device=device).clamp(max=t)


def decision_ages(j: int, stride: int, t: int, device=None) -> torch.Tensor:
    """(J, T) float: each key's age ``t_j - i`` at each decision time (0 for keys not yet
    there)."""
    times = decision_times(j, stride, t, device)
    return (times[:, None] - torch.arange(t, device=device)).clamp(min=0).float()


_SINK_ATTR = "_kvbound_capture"


def _capture_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     **kwargs):
    """transformers attention function: SDPA, and hand (query, key) to the module's sink."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    sink = module.__dict__.get(_SINK_ATTR)
    if sink is not None:
        sink(query, key, scaling if scaling is not None else query.shape[-1] ** -0.5,
             attention_mask)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def _register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_NAME, _capture_forward)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)
    return CAPTURE_NAME


@torch.no_grad()
def future_attention_tables(model, ids: torch.Tensor, *, stride: int = 16,
                            horizon: int | None = None) -> dict[int, torch.Tensor]:
    """``{layer: (B, H_kv, J, T)}``: for every evicted layer, the future attention mass of each
    key at the decision times ``j * stride`` (``j < J = ceil(T / stride) + 1``) over the next
    ``horizon`` queries (all later ones when ``None``), from the full model's attention on
    ``ids`` (B, T) (rows without padding: the tables index keys by position)."""
    from kvbound.train.rank_loss import _keep_mask, future_attention

    check_int("stride", stride, minimum=1)
    if horizon is not None:
        check_int("horizon", horizon, minimum=1)
    b, t = ids.shape
    w = t if horizon is None else horizon
    times = decision_times(-(-t // stride) + 1, stride, t, ids.device)
    keep_layers = set(evicted_layers(model))
    tables: dict[int, torch.Tensor] = {}
    modules = attention_modules(model)

    def sink_for(idx):
        def sink(query, key, scaling, mask):
            keep = _keep_mask(mask, b, t, query.device)
            tables[idx] = future_attention(query, key, scaling, keep, times, w, 1)
        return sink

    prev = model.config._attn_implementation
    try:
        for module in modules:
            if module.layer_idx in keep_layers:
                module.__dict__[_SINK_ATTR] = sink_for(module.layer_idx)
        model.set_attn_implementation(_register())
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        model.set_attn_implementation(prev)
        for module in modules:
            module.__dict__.pop(_SINK_ATTR, None)
    missing = keep_layers - set(tables)
    if missing:
        raise KVBoundError(f"No attention was captured for layers {sorted(missing)}: the model's "
                           "attention modules do not call transformers' attention interface.")
    return tables


def oracle_policy(model, ids: torch.Tensor, *, stride: int = 16, horizon: int | None = None,
                  fit: str | None = None, fit_steps: int = 300, fit_topm: int | None = None
                  ) -> FutureAttentionOracle | FittedRetentionOracle:
    """The oracle policy for a cache that will be fed exactly ``ids``: the future-attention
    oracle, or (``fit`` one of :data:`FITS`) the best per-token retention fitted to its tables
    (``fit_topm``: then fitted further to a sequential top-M cut, :func:`fit_retention`)."""
    tables = future_attention_tables(model, ids, stride=stride, horizon=horizon)
    if fit is None:
        return FutureAttentionOracle(tables=tables, stride=stride, horizon=horizon)
    log_beta, offset, kl = fit_retention(tables, stride, form=fit, steps=fit_steps, topm=fit_topm)
    record = {"form": fit, "horizon": horizon, "stride": stride, "steps": fit_steps,
              "listwise_kl": kl}
    if fit_topm is not None:
        record["topm"] = fit_topm
    return FittedRetentionOracle(log_beta=log_beta, offset=offset, fit=record)


def fit_retention(tables: dict[int, torch.Tensor], stride: int, *, form: str = "trimkv",
                  steps: int = 300, lr: float = 0.05, topm: int | None = None
                  ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], float]:
    """Per-token ``log beta`` (and offsets) whose scores best fit the future-attention tables.

    The attention-rank objective (:mod:`kvbound.train.rank_loss`) with free per-token numbers in
    place of a gate: at every tabled decision time ``t = j * stride`` the keys ``i < t`` are
    ranked by ``s_t(i) = [a_i +] (t - i) log beta_i`` and ListNet's cross-entropy to the tables'
    distribution is minimised (Adam, ``steps`` steps), one list per KV head (a per-head cache).
    ``topm=M``: then ``steps`` more steps on the cut a per-head cache of budget M makes, in
    sequence (:func:`kvbound.train.rank_loss.topm_lost_mass`, ``sequential`` and ``relative``
    with tau 0.1, as the shipped gates are trained): the one-shot ranking ListNet fits ignores
    that an evicted key never returns, this fit does not.
    Returns ``(log_beta, offset, listwise_kl)``, ``offset`` empty for ``form="trimkv"``, the KL
    that of the listwise fit (before any ``topm`` steps).
    """
    if form not in FITS:
        raise KVBoundError(f"form must be one of {', '.join(FITS)}, got {form!r}.")
    check_int("stride", stride, minimum=1)
    check_int("steps", steps, minimum=1)
    if topm is not None:
        check_int("topm", topm, minimum=1)
    layers = sorted(tables)
    b, h, j, t = tables[layers[0]].shape
    device = tables[layers[0]].device
    cand = torch.arange(t, device=device) < decision_times(j, stride, t, device)[:, None]  # (J, T)
    age = decision_ages(j, stride, t, device)
    flow = torch.stack([tables[k].float() for k in layers]) * cand  # (L, B, H, J, T)
    mass = flow.sum(-1, keepdim=True)
    target = flow / mass.clamp_min(1e-30)
    weight = (mass > 0).float()
    entropy = -(target * torch.where(target > 0, target.log(), 0.0)).sum(-1, keepdim=True)
    norm = weight.sum().clamp_min(1.0)
    with torch.enable_grad():
        z = torch.full((len(layers), b, h, 1, t), 4.0, requires_grad=True)  # beta ~ 0.98
        a = torch.zeros((len(layers), b, h, 1, t), requires_grad=form != "trimkv")
        opt = torch.optim.Adam([z, a] if a.requires_grad else [z], lr=lr)
        for _ in range(steps):
            scores = _fitted_scores(z, a, age, cand)
            logz = scores.logsumexp(-1, keepdim=True)
            ce = -(target * (scores - logz).masked_fill(~cand, 0.0)).sum(-1, keepdim=True)
            loss = (ce * weight).sum() / norm
            opt.zero_grad()
            loss.backward()
            opt.step()
        kl = float(((ce - entropy).detach() * weight).sum() / norm)
        if topm is not None:
            _fit_sequential_cut(z, a, age, cand, flow, weight, topm, steps, lr)
    log_beta = torch.nn.functional.logsigmoid(z.detach())[:, :, :, 0]
    offset = a.detach()[:, :, :, 0] if form != "trimkv" else None
    return ({k: log_beta[n] for n, k in enumerate(layers)},
            {k: offset[n] for n, k in enumerate(layers)} if offset is not None else {}, kl)


def _fitted_scores(z, a, age, cand) -> torch.Tensor:
    """``a_i + age * log beta_i`` at every decision time, ``-inf`` where a key is not there yet."""
    return (a + age * torch.nn.functional.logsigmoid(z)).masked_fill(~cand, -torch.inf)


def _fit_sequential_cut(z, a, age, cand, flow, weight, keep, steps, lr) -> None:
    """Adam steps on ``z`` (log beta = logsigmoid(z)) and ``a`` (when it has a gradient) that
    lower the future attention a sequential per-head top-``keep`` cut throws away."""
    from kvbound.train.rank_loss import RankLists, topm_lost_mass

    params = [z, a] if a.requires_grad else [z]
    opt = torch.optim.Adam(params, lr=lr)
    lists_cand = cand.expand_as(flow)
    for _ in range(steps):
        lists = RankLists(flow, _fitted_scores(z, a, age, cand), lists_cand, weight[..., 0])
        loss, _ = topm_lost_mass(lists, keep, tau=0.1, sequential=True, relative=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
