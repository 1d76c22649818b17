"""Per-group compression of the model section (issue 11, COMPRESSOR=group): the quantized weights bucketed by role,
each bucket laid out the way it compresses best and compressed with the best back-end the host has.

Facts from openai/parameter-golf #1855 (its README, "Per-group compression", and its serializer): it buckets the int6
GPTQ codes by role across layers (token embedding, attention q/k/v/o, MLP up, MLP down), sorts the rows of three "hot"
buckets (embedding, q, MLP up) by a greedy L1 nearest-neighbour walk, writes every matrix transposed (column-major),
stores the row order as uint16, compresses each bucket with `lrzip -z -L 9` (ZPAQ) and the rest (scales, control
tensors, metadata) with brotli; ~280 KB smaller than brotli at record size, ~75 s more serialize time.

What this module does, on the artifact's own format (lcq.artifact, format 2; one file, nothing forked):
- The model's artifact section splits into sections: `model` (everything that is not a 2-D int8 code matrix, and the
  caller's meta) and one `model_<role>` section per role bucket (GROUPS order). Each is an ordinary section, so its
  bytes are exactly its bytes under the cap, and the LoRA section follows as before.
- Layout per bucket, chosen from measurements on the trained demo model's GPTQ codes (BENCHMARKS.md, issue 11): the
  plain row-major layout is always compressed; a column-major layout, and for the HOT_GROUPS largest buckets a
  column-major layout of rows in similarity order, are scored by a cheap proxy (the empirical order-1 entropy of the
  code stream, plus ~log2(rows) bits per row for a stored order), and the proxy's pick is compressed beside the plain
  one when it promises at least MIN_PROXY_GAIN. Column-major won 5% on the MLP down projections (columns are hidden
  units, whose magnitudes differ); the row order won 4% on the embedding (similar tokens side by side) and lost to
  plain column-major on every other bucket (the stored order cost more than it saved), so the proxy, not a fixed list,
  decides.
- Back-ends: lrzip (`lcq.artifact`, ZPAQ, as #1855) and brotli when the lrzip binary is on PATH, brotli alone
  otherwise; every section keeps its smallest (layout, back-end) pair. lrzip is ~1.4x brotli's CPU (8.5 s per 4 MiB
  chunk on the 2-core CI machine), so the job drops it when its measured rates project it past the deadline the
  pipeline gives (artifact.CompressJob): brotli is every section's fallback. So each `model_<role>` section is never larger
  than brotli of that bucket's plain layout (same manifest, same chunking): that is what the mode guarantees, not that
  the model's sections together beat one brotli section (each extra section costs its header and manifest).
- The row order is a permutation stored inside the tensor's bytes ("grouped" layout, lcq.artifact) and undone at
  decode, bit for bit. It is a greedy nearest-neighbour walk under squared L2 (one exact Gram matmul instead of #1855's
  L1 walk: int6 codes make every dot product an integer far below 2**24, so float32 sums are exact and the order is the
  same on every machine).
All of it runs on the compression job's threads (artifact.CompressJob), not the caller's, the buckets planned in
parallel: the pipeline starts it right after GPTQ, while LCQ distils.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping

import numpy as np
import torch

from . import artifact

# Role buckets in section order; names are matched on the quantized code tensors ("<param>.q", lcq.gptq).
GROUPS: tuple[tuple[str, re.Pattern], ...] = tuple((role, re.compile(pattern)) for role, pattern in (
    ("embed", r"tok_emb\.weight\.q"),
    ("attn_q", r"blocks\.\d+\.attn\.c_q\.weight\.q"),
    ("attn_k", r"blocks\.\d+\.attn\.c_k\.weight\.q"),
    ("attn_v", r"blocks\.\d+\.attn\.c_v\.weight\.q"),
    ("attn_o", r"blocks\.\d+\.attn\.proj\.weight\.q"),
    ("mlp_up", r"blocks\.\d+\.mlp\.fc\.weight\.q"),
    ("mlp_down", r"blocks\.\d+\.mlp\.proj\.weight\.q"),
    ("other", r".+\.q"),  # any other code matrix (an untied head, ...)
))
# Buckets (largest first by code bytes) whose rows may be put in similarity order: #1855 sorted three.
HOT_GROUPS = 3
# A layout other than the plain one is compressed only when the proxy promises at least this fraction fewer bytes:
# on random-init codes every layout scores within ~0.1% and none compresses smaller, so they cost nothing extra there.
MIN_PROXY_GAIN = 0.002
# The similarity walk holds a rows x rows distance matrix (~0.8 GB at peak for the record's 8192-row embedding);
# larger matrices keep their order.
SORT_MAX_ROWS = 8192


def backends() -> tuple[str, ...]:
    """The back-ends a group section tries, best first: lrzip (when its binary is on PATH) and brotli."""
    return ("lrzip", "brotli") if artifact.lrzip_binary() else ("brotli",)


def describe_backends() -> str:
    """One log line: which back-ends the group mode uses on this host, and why."""
    exe = artifact.lrzip_binary()
    if exe:
        return f"compressor group: lrzip at {exe} and brotli, the smaller per section"
    return f"compressor group: no lrzip binary on PATH, brotli fallback (for lrzip: {artifact.LRZIP_INSTALL})"


def section_compressor(compressor: str) -> str:
    """The compressor of a section that is not split into groups (the LoRA's) under COMPRESSOR=`compressor`."""
    return "brotli" if compressor == "group" else compressor


def role_of(name: str, t: torch.Tensor) -> str | None:
    """The bucket of a tensor: a 2-D int8 code matrix by its name, None for everything else."""
    if t.dtype != torch.int8 or t.dim() != 2:
        return None
    return next((role for role, pattern in GROUPS if pattern.fullmatch(name)), None)


def similarity_order(codes: np.ndarray) -> np.ndarray:
    """Rows of a 2-D int8 matrix in greedy nearest-neighbour order under squared L2: start at row 0, then always the
    closest row not yet taken (ties: the lowest index). Exact, so the same on every machine: every distance and every
    partial sum is an integer of magnitude at most 4 * cols * peak**2, held exactly by float32 whatever the summation
    order while that is below 2**24 (int7 embedding rows of 512: 8.1 M), else by float64."""
    rows, cols = codes.shape
    if rows <= 2:
        return np.arange(rows)
    peak = int(np.abs(codes.astype(np.int32)).max(initial=0))
    dtype = torch.float32 if 4 * cols * peak * peak < (1 << 24) else torch.float64
    x = torch.from_numpy(codes).to(dtype)
    sq = (x * x).sum(1)
    dist = sq[:, None] + sq[None, :] - 2 * (x @ x.T)
    taken = torch.zeros(rows, dtype=torch.bool)
    order = [0]
    taken[0] = True
    inf = torch.tensor(float("inf"), dtype=dtype)
    for _ in range(rows - 1):
        nxt = int(torch.where(taken, inf, dist[order[-1]]).argmin())
        order.append(nxt)
        taken[nxt] = True
    return np.asarray(order, dtype=np.int64)


def order1_bytes(stream: np.ndarray) -> float:
    """Empirical order-1 entropy of a byte stream, in bytes: the proxy for what a context-modelling compressor
    (brotli's literal contexts, ZPAQ) makes of a layout."""
    x = stream.reshape(-1).view(np.uint8).astype(np.int64)
    if x.size < 2:
        return float(x.size)
    pairs = np.bincount(x[:-1] * 256 + x[1:], minlength=65536).reshape(256, 256).astype(np.float64)
    ctx = pairs.sum(1, keepdims=True)
    nz = pairs > 0
    return float(-(pairs[nz] * np.log2((pairs / np.where(ctx > 0, ctx, 1))[nz])).sum() / 8)


def _layout_stream(codes: dict[str, np.ndarray], arrange: Mapping[str, artifact.Arrangement] | None) -> np.ndarray:
    parts = []
    for name in sorted(codes):
        a = codes[name]
        how = (arrange or {}).get(name)
        if how is not None:
            a = a[how.perm] if how.perm is not None else a
            a = a.T if how.major == "col" else a
        parts.append(np.ascontiguousarray(a).reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0, np.int8)


def plan_group(codes: dict[str, np.ndarray], hot: bool) -> list[tuple[str, dict[str, artifact.Arrangement] | None]]:
    """The layouts to compress for one bucket: the plain one (None: lcq.artifact's default layout), then the proxy's
    pick among column-major and (hot buckets) similarity-ordered column-major, if it promises MIN_PROXY_GAIN."""
    plain = order1_bytes(_layout_stream(codes, None))
    candidates = {"col": {n: artifact.Arrangement("col") for n in codes}}
    if hot and all(a.shape[0] <= SORT_MAX_ROWS for a in codes.values()):
        candidates["sorted"] = {n: artifact.Arrangement("col", similarity_order(a)) for n, a in codes.items()}
    scores = {}
    for label, arrange in candidates.items():
        order_bits = sum(a.shape[0] * np.log2(max(a.shape[0], 2)) for a in codes.values()) if label == "sorted" else 0
        scores[label] = order1_bytes(_layout_stream(codes, arrange)) + order_bits / 8
    pick = min(scores, key=scores.get)
    plan: list[tuple[str, dict[str, artifact.Arrangement] | None]] = [("row", None)]
    if scores[pick] <= plain * (1 - MIN_PROXY_GAIN):
        plan.append((pick, candidates[pick]))
    return plan


def split(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(bucket -> its code matrices, the rest), as CPU copies (the caller may change its tensors afterwards)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():  # the quantized state (lcq.gptq): tensors
        copy = t.detach().to("cpu", copy=True).contiguous()
        role = role_of(name, copy)
        if role is None:
            rest[name] = copy
        else:
            groups.setdefault(role, {})[name] = copy
    return groups, rest


def build_units(groups: dict[str, dict[str, torch.Tensor]], rest: dict[str, torch.Tensor], meta: dict,
                compressors: tuple[str, ...], threads: int = 1) -> list[artifact.Unit]:
    """The sections of the model in group mode: `model` (the rest + meta), then one per bucket in GROUPS order, each
    with its planned layouts (plan_group) and the back-ends `compressors`. The buckets are planned on `threads`
    threads at once (issue 25: one thread planned all eight in turn while a many-core host's other cores waited; the
    Gram matmul and numpy's counts release the GIL); the plans do not depend on it."""
    sizes = {role: sum(t.numel() for t in ts.values()) for role, ts in groups.items()}
    hot = set(sorted(sizes, key=lambda r: (-sizes[r], r))[:HOT_GROUPS])
    roles = [role for role, _ in GROUPS if role in groups]

    def unit(role: str) -> artifact.Unit:
        codes = {n: t.numpy() for n, t in groups[role].items()}
        variants = tuple((label, artifact._payload(groups[role], {"group": role}, arrange))
                         for label, arrange in plan_group(codes, role in hot))
        return artifact.Unit(f"model_{role}", variants, compressors)

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="lcq-plan") as pool:
        return [artifact.Unit("model", (("", artifact._payload(rest, meta)),), compressors), *pool.map(unit, roles)]


def model_job(tensors: Mapping[str, torch.Tensor], meta: dict, compressor: str, threads: int | None = None,
              deadline: float | None = None, keep: tuple[str, ...] | None = None,
              cache: dict | None = None) -> artifact.CompressJob:
    """The model's artifact section(s) being compressed on host threads: one section (artifact.SectionJob) for
    lzma/brotli/auto; for "group", the sections above, planned and compressed on the job's threads. `deadline`
    (seconds): when it is projected past it from the chunks it has timed, the job drops lrzip (auto: lzma) and keeps
    brotli (artifact.CompressJob); each section records its compressor, so the artifact decodes either way.
    `keep` (group): the back-ends to try instead of all the host has (the fit's probes keep what the base job kept);
    `cache`: chunks already compressed (artifact.CompressJob)."""
    if compressor != "group":
        return artifact.SectionJob("model", tensors, meta, compressor, threads, deadline=deadline, cache=cache)
    groups, rest = split(tensors)
    compressors = keep or backends()
    return artifact.CompressJob(lambda: build_units(groups, rest, meta, compressors, threads or os.cpu_count() or 1),
                                threads, deadline=deadline, cache=cache)
