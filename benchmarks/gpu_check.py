"""One check of the device path on a machine with one CUDA GPU; the driver of gpu_check.sh.

    python benchmarks/gpu_check.py [--out results/gpu_check.json] [--device cuda] [--quick]

Five parts, each in a process of its own with a time box (a part that fails or runs over is
recorded as failed, with its error, and the others still run):

  reference  the engine against transformers, greedy, token by token: llama, opt and falcon made
             by make_model; float32 (32 tokens, all equal), float16 and bfloat16 (the first 16
             equal); p = 1 and 2 in-process stages. Beside it each one's logits error against
             exact ones (transformers in float32 on the CPU), and whether every token difference
             is a near-tie (the two tokens' exact logits closer than that error): random-weight
             models have many, and bfloat16 breaks some of them either way
  pipeline   a p = 2 pipeline of two worker processes on the device (store, agents, workers as
             `hydraserve generate --processes` starts them), consolidated mid-stream: its tokens
             against one in-process engine; whether any worker logged a failed registration
  h2d        GB/s host to device from a shared-memory region registered as h2d does, from a
             torch pinned tensor (the target: registered >= 0.9x pinned), from pageable memory
  speed      the engine's TPOT at batch 1 and 8 and prefill tokens/s, beside transformers'
             `generate` and forward on the same model
  coldstart  one cold request through `hydraserve serve` (the cluster file's device) with one
             warm runtime: TTFT and the instance's timeline

Everything lands in one JSON file with the GPU's name. ``--device cpu --quick`` runs the same
logic on CPU with tiny sizes (tests/test_gpu_check.py); what needs CUDA (registration, pinned
memory) is then recorded as skipped, with the reason.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydraserve.make_model import ModelSpec, make_model  # noqa: E402 - torch-free

PROMPTS = ["def main(argv):", "import os\nimport sys\n\nclass Config(object):\n    pass",
           "The quick brown fox"]
ARCHS = ("llama", "opt", "falcon")
DTYPES = ("float32", "float16", "bfloat16")
TIME_BOX_S = {"reference": 120, "pipeline": 75, "h2d": 40, "speed": 110, "coldstart": 90}


@dataclass(frozen=True)
class Ctx:
    device: str
    quick: bool
    work: Path  # models made here are shared by the parts

    def model(self, name: str, spec: ModelSpec) -> str:
        path = self.work / "models" / name
        if not (path / "config.json").exists():
            make_model(path, spec)
        return str(path)

    def small(self, arch: str) -> str:
        """The reference models (4 layers: p = 2 splits them; quick: 2)."""
        size = dict(hidden=64, layers=2, vocab=512) if self.quick else \
            dict(hidden=256, layers=4, vocab=2048)
        return self.model(arch, ModelSpec(arch=arch, heads=4, seed=ARCHS.index(arch) + 1, **size))


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _hf_model(model_dir: str, device: str, dtype: str):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None
    return model


# -- parts ----------------------------------------------------------------------------------------
def part_reference(ctx: Ctx) -> dict:
    """Greedy tokens of the engine and of transformers in each dtype, and how far each one's
    last-prompt-token logits are from exact ones (transformers in float32 on the CPU). A case
    whose tokens differ still ``agrees`` when every first difference is a near-tie: the two
    tokens' exact logits are closer than the dtype's own error (the larger of the two errors,
    twice) -- in reduced precision either token is a right answer there."""
    import torch

    from hydraserve.engine.config import EngineConfig
    from hydraserve.engine.engine import LLMEngine
    from hydraserve.engine.sequence import SamplingParams
    from hydraserve.tokenizer import Tokenizer

    def rel_err(logits: list, exact: list) -> float:
        return max(float((a.float().cpu() - b).abs().max() / b.abs().max())
                   for a, b in zip(logits, exact))

    cases = []
    for arch in ARCHS:
        model_dir = ctx.small(arch)
        prompts = [Tokenizer.from_dir(model_dir).encode(p) for p in PROMPTS]
        master = _hf_model(model_dir, "cpu", "float32")  # loaded once, cast for each dtype

        def exact_logits(ids: list[int]) -> torch.Tensor:
            with torch.no_grad():
                return master(torch.tensor([ids])).logits[0, -1]

        exact = [exact_logits(ids) for ids in prompts]
        for dtype in DTYPES:
            n = 32 if dtype == "float32" else 16
            hf = copy.deepcopy(master).to(device=ctx.device, dtype=getattr(torch, dtype))
            with torch.no_grad():
                ref = [hf.generate(torch.tensor([ids], device=ctx.device), max_new_tokens=n,
                                   do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
                       for ids in prompts]
                hf_err = rel_err([hf(torch.tensor([ids], device=ctx.device)).logits[0, -1]
                                  for ids in prompts], exact)
            del hf
            for p in (1, 2):
                engine = LLMEngine(model_dir, EngineConfig(device=ctx.device, dtype=dtype),
                                   pipeline=p)
                got = [r.token_ids for r in engine.generate(
                    prompts, SamplingParams(max_tokens=n, ignore_eos=True))]
                err = rel_err([engine.prompt_logits(ids) for ids in prompts], exact)
                del engine
                first = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), None)
                         for g, r in zip(got, ref)]
                gaps = []  # the two tokens' exact logits apart, at each first difference
                for ids, g, r, i in zip(prompts, got, ref, first):
                    if i is not None:
                        x = exact_logits(ids + r[:i])
                        gaps.append(round(float((x[r[i]] - x[g[i]]).abs() / x.abs().max()), 6))
                tolerance = 2 * max(err, hf_err)
                cases.append({"arch": arch, "dtype": dtype, "p": p, "tokens": n,
                              "match": got == ref, "first_mismatch": first,
                              "logits_rel_err": round(err, 6),
                              "transformers_logits_rel_err": round(hf_err, 6),
                              "mismatch_gaps": gaps,
                              "agrees": all(gap <= tolerance for gap in gaps)})
            _free(ctx.device)
    return {"status": "ok", "all_match": all(c["match"] for c in cases),
            "all_agree": all(c["agrees"] for c in cases), "cases": cases}


def part_pipeline(ctx: Ctx) -> dict:
    from hydraserve.cluster.pipeline import GroupConfig, LocalPipeline
    from hydraserve.engine.config import EngineConfig
    from hydraserve.engine.engine import LLMEngine
    from hydraserve.engine.sequence import SamplingParams

    model_dir = ctx.small("llama")
    long_n = 60 if ctx.quick else 300
    requests = [([5, 9, 13], long_n), ([42, 7], 16)]
    engine = LLMEngine(model_dir, EngineConfig(device=ctx.device))
    expected = [engine.generate([p], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids
                for p, n in requests]
    del engine
    _free(ctx.device)
    logs = ctx.work / "pipeline-logs"
    cfg = GroupConfig(model_dir, p=2, all_card=(0,), engine=EngineConfig(device=ctx.device),
                      log_dir=str(logs))
    with LocalPipeline(cfg) as pipe:
        tokens, consolidate_at = [], 6
        for item in pipe.generate(requests[0][0], max_tokens=long_n, ignore_eos=True):
            if "error" in item:
                raise RuntimeError(f"the stream ended with an error: {item}")
            tokens.append(item["token_id"])
            last_token_at = time.time()  # the clock of the workers' timelines
            if len(tokens) == consolidate_at:
                pipe.consolidate()
        deadline = time.monotonic() + 30
        while not pipe.health(0)["standalone"] and time.monotonic() < deadline:
            time.sleep(0.1)
        head = pipe.health(0)
        after = [it.get("token_id") for it in pipe.generate(
            requests[1][0], max_tokens=requests[1][1], ignore_eos=True)]
    timeline = head["timeline"]
    failures = sum(f.read_text().count("cudaHostRegister") for f in logs.glob("worker-*.log"))
    return {"status": "ok", "tokens_match": tokens == expected[0],
            "after_consolidation_match": after == expected[1],
            "consolidated": "consolidated" in timeline, "standalone": head["standalone"],
            # consolidated before the stream's last token: the switch was mid-stream
            "consolidated_mid_stream": timeline.get("consolidated", last_token_at) < last_token_at,
            "registration_failures_logged": failures, "timeline": timeline}


def _gbps(nbytes: int, copy, device: str, reps: int) -> float:
    copy()  # warm-up
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        copy()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return round(nbytes / statistics.median(times) / 1e9, 3)


def part_h2d(ctx: Ctx) -> dict:
    from multiprocessing import shared_memory

    import torch

    from hydraserve.engine.h2d import CudaBackend, HostRegistration

    size = (8 << 20) if ctx.quick else (1 << 30)
    reps = 3 if ctx.quick else 5
    cuda = ctx.device.startswith("cuda")
    out: dict = {"status": "ok", "bytes": size}
    shm = shared_memory.SharedMemory(create=True, size=size)
    reg = host = None
    try:
        host = torch.frombuffer(shm.buf, dtype=torch.uint8)
        host.fill_(1)
        dst = torch.empty(size, dtype=torch.uint8, device=ctx.device)
        pageable = torch.ones(size, dtype=torch.uint8)
        out["pageable_gbps"] = _gbps(size, lambda: dst.copy_(pageable), ctx.device, reps)
        if not cuda:
            why = "needs CUDA (cudaHostRegister, pinned memory); this run is on CPU"
            out["registered_gbps"] = out["pinned_gbps"] = skipped(why)
            out["registered_to_pinned"] = skipped(why)
        else:
            pinned = torch.ones(size, dtype=torch.uint8, pin_memory=True)
            out["pinned_gbps"] = _gbps(
                size, lambda: dst.copy_(pinned, non_blocking=True), ctx.device, reps)
            reg = HostRegistration(shm.buf, CudaBackend(torch.device(ctx.device)))
            if not reg.ok:
                out["registered_gbps"] = {"status": "failed", "error": "cudaHostRegister failed"}
            else:
                out["registered_gbps"] = _gbps(
                    size, lambda: dst.copy_(host, non_blocking=True), ctx.device, reps)
                ratio = out["registered_gbps"] / out["pinned_gbps"]
                out["registered_to_pinned"] = round(ratio, 3)
                out["meets_0_9x"] = ratio >= 0.9
    finally:
        host = None  # the view's export of the buffer, which close() refuses while it lives
        if reg is not None:
            reg.release()
        shm.close()
        shm.unlink()
    return out


def part_speed(ctx: Ctx) -> dict:
    import torch

    from hydraserve.engine.config import EngineConfig
    from hydraserve.engine.engine import LLMEngine
    from hydraserve.engine.sequence import SamplingParams

    if ctx.quick:  # the reference part's llama
        model_dir, vocab, dtype, steps, prompt_len, prefill_len = \
            ctx.small("llama"), 512, "float32", 6, 16, 64
    else:  # ~0.7 B parameters at float16
        model_dir = ctx.model("speed", ModelSpec(arch="llama", hidden=2048, layers=12, heads=16,
                                                 kv_heads=8, vocab=32000, dtype="float16", seed=11))
        vocab, dtype, steps, prompt_len, prefill_len = 32000, "float16", 64, 16, 512
    if not ctx.device.startswith("cuda"):
        dtype = "float32"
    gen = torch.Generator().manual_seed(0)

    def ids(n: int, length: int) -> list[list[int]]:
        return torch.randint(3, vocab, (n, length), generator=gen).tolist()

    engine = LLMEngine(model_dir, EngineConfig(device=ctx.device, dtype=dtype, max_num_seqs=8))
    ours: dict = {}
    engine.generate(ids(1, prompt_len), SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    for batch in (1, 8):
        for p in ids(batch, prompt_len):
            engine.add_request(p, SamplingParams(max_tokens=steps, ignore_eos=True))
        times = []
        while engine.scheduler.has_unfinished():
            t0 = time.perf_counter()
            engine.step()  # returns sampled tokens: the step has finished on the device
            times.append(time.perf_counter() - t0)
        ours[f"tpot_ms_batch{batch}"] = round(statistics.median(times[1:]) * 1e3, 3)
    engine.generate(ids(1, prefill_len), SamplingParams(max_tokens=1))  # warm-up
    t0 = time.perf_counter()
    engine.generate(ids(1, prefill_len), SamplingParams(max_tokens=1))
    ours["prefill_tok_s"] = round(prefill_len / (time.perf_counter() - t0), 1)
    del engine
    _free(ctx.device)

    hf = _hf_model(model_dir, ctx.device, dtype)
    ref: dict = {}

    def timed_generate(x: torch.Tensor, n: int) -> float:
        _sync(ctx.device)
        t0 = time.perf_counter()
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=0)
        _sync(ctx.device)
        return time.perf_counter() - t0

    with torch.no_grad():
        for batch in (1, 8):
            x = torch.tensor(ids(batch, prompt_len), device=ctx.device)
            timed_generate(x, 2)  # warm-up
            one, full = timed_generate(x, 1), timed_generate(x, steps)
            ref[f"tpot_ms_batch{batch}"] = round((full - one) / (steps - 1) * 1e3, 3)
        x = torch.tensor(ids(1, prefill_len), device=ctx.device)
        hf(x)
        _sync(ctx.device)
        t0 = time.perf_counter()
        hf(x)
        _sync(ctx.device)
        ref["prefill_tok_s"] = round(prefill_len / (time.perf_counter() - t0), 1)
    return {"status": "ok", "dtype": dtype, "decode_steps": steps, "prompt_len": prompt_len,
            "prefill_len": prefill_len, "engine": ours, "transformers": ref,
            "tpot_ratio_batch1": round(ours["tpot_ms_batch1"] / ref["tpot_ms_batch1"], 3),
            "tpot_ratio_batch8": round(ours["tpot_ms_batch8"] / ref["tpot_ms_batch8"], 3)}


def part_coldstart(ctx: Ctx) -> dict:
    import urllib.request

    import yaml

    from hydraserve.store.launch import ServerProcess

    def get(url: str) -> dict:
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.loads(r.read())

    gpu_gb = 24.0
    if ctx.device.startswith("cuda"):
        import torch

        gpu_gb = float(torch.cuda.get_device_properties(0).total_memory // 10**9)
    d = ctx.work / "coldstart"
    d.mkdir(exist_ok=True)
    (d / "cluster.yaml").write_text(yaml.safe_dump({
        "device": ctx.device, "scale": {"size_scale": 1, "after_fetch_ms": 2000},
        "servers": [{"name": "node0", "gpus": [gpu_gb], "nic_gbps": 100.0, "cache_gb": 0}]}))
    (d / "models.yaml").write_text(yaml.safe_dump({"models": [
        {"name": "check", "path": ctx.small("llama"), "ttft_slo_s": 30}]}))
    gw = ServerProcess(["serve", "--cluster", str(d / "cluster.yaml"), "--models",
                        str(d / "models.yaml"), "--port", "0", "--keep-alive", "60",
                        "--warm-runtime", "1", "--log-dir", str(d / "logs")],
                       d / "serve.log", timeout=60)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pools = get(gw.url + "/admin/instances").get("warm_runtimes") or {}
            if pools and all(p["imported"] >= 1 for p in pools.values()):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("the warm runtime did not finish its imports in 60 s")
        body = json.dumps({"model": "check", "prompt": "def main():", "max_tokens": 4,
                           "temperature": 0, "stream": True}).encode()
        req = urllib.request.Request(gw.url + "/v1/completions", body,
                                     {"Content-Type": "application/json"})
        t0 = time.perf_counter()
        ttft = None
        with urllib.request.urlopen(req, timeout=60) as r:
            for line in r:
                if ttft is None and line.startswith(b"data: {") and b'"text"' in line:
                    ttft = time.perf_counter() - t0
        if ttft is None:
            raise RuntimeError("the stream carried no token")
        inst = max(get(gw.url + "/admin/instances")["instances"], key=lambda i: i["id"])
        pools = get(gw.url + "/admin/instances").get("warm_runtimes")
    finally:
        gw.stop()
    return {"status": "ok", "ttft_s": round(ttft, 3), "placement_p": inst.get("placement_p"),
            "timeline": inst.get("timeline"), "warm_runtimes": pools}


PARTS = {"reference": part_reference, "pipeline": part_pipeline, "h2d": part_h2d,
         "speed": part_speed, "coldstart": part_coldstart}


# -- the driver -----------------------------------------------------------------------------------
def run_part(name: str, args: argparse.Namespace, work: Path, box: float) -> dict:
    """Run one part in a process (and session) of its own; stop it, and whatever it started,
    when its time box is over."""
    out = work / f"{name}.json"
    cmd = [sys.executable, __file__, "--part", name, "--work", str(work), "--device", args.device,
           *(["--quick"] if args.quick else [])]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=box)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        log = proc.stdout.read() if proc.stdout else ""
        return {"status": "failed", "error": f"ran past its time box of {box:.0f} s",
                "log_tail": log[-2000:], "seconds": round(time.monotonic() - t0, 1)}
    except BaseException:  # the driver itself is stopped: so is the part
        _stop_group(proc)
        raise
    if proc.returncode != 0 or not out.exists():
        return {"status": "failed", "error": f"exit code {proc.returncode}",
                "log_tail": log[-2000:], "seconds": round(time.monotonic() - t0, 1)}
    return {**json.loads(out.read_text()), "seconds": round(time.monotonic() - t0, 1)}


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the part and every process it started (agents free their shared memory on
    it), SIGKILL to what is left after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def device_info(device: str) -> dict:
    import torch

    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["gpu"] = None
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="results/gpu_check.json", help="the JSON file to write")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (for the CPU dry run)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="all parts together; a part's box shrinks to what is left")
    ap.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # a part's process
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    # the processes the parts start (workers, agents, serve) import this checkout
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                             os.environ.get("PYTHONPATH")]))
    if args.part:
        ctx = Ctx(args.device, args.quick, Path(args.work))
        result = PARTS[args.part](ctx)
        (ctx.work / f"{args.part}.json").write_text(json.dumps(result))
        return 0

    # a SIGTERM unwinds the driver, which stops the running part's processes (see run_part)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    results = {**device_info(args.device), "quick": args.quick, "parts": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name in args.parts.split(","):
            left = args.budget_s - (time.monotonic() - started)
            if left < 5:
                results["parts"][name] = {"status": "failed", "error": "no time left"}
                continue
            res = run_part(name, args, Path(tmp), min(TIME_BOX_S[name], left))
            results["parts"][name] = res
            print(f"{name:<10} {res['status']:<8} {res.get('seconds', 0):>6.1f} s  "
                  f"{res.get('error', '')}", flush=True)
            results["seconds"] = round(time.monotonic() - started, 1)
            out.write_text(json.dumps(results, indent=1) + "\n")  # what is done, if stopped later
    print(summary(results))
    print(f"wrote {out}")
    return 0 if all(r["status"] != "failed" for r in results["parts"].values()) else 1


def _fig(v) -> str:
    """A figure, or what stood in for it (skipped, failed)."""
    return v["status"] if isinstance(v, dict) else str(v)


def summary(r: dict) -> str:
    """The figures a person compares, one line each."""
    p = r["parts"]
    lines = [f"device {r['device']} ({r['gpu'] or 'no GPU'}), torch {r['torch']}"]
    ref = p.get("reference", {})
    if ref.get("status") == "ok":
        cases = ref["cases"]
        differ = [f"{c['arch']}/{c['dtype']}/p{c['p']}" for c in cases if not c["match"]]
        wrong = [f"{c['arch']}/{c['dtype']}/p{c['p']}" for c in cases if not c["agrees"]]
        worst = {d: max(c["logits_rel_err"] for c in cases if c["dtype"] == d) for d in DTYPES}
        worst_hf = {d: max(c["transformers_logits_rel_err"] for c in cases if c["dtype"] == d)
                    for d in DTYPES}
        lines.append(f"reference: {len(cases) - len(differ)}/{len(cases)} cases token-identical "
                     f"to transformers{' (differ: ' + ', '.join(differ) + ')' if differ else ''};"
                     f" {len(cases) - len(wrong)}/{len(cases)} agree, differences at near-ties "
                     f"only{' (not: ' + ', '.join(wrong) + ')' if wrong else ''}")
        lines.append("logits error vs exact, engine / transformers: " + ", ".join(
            f"{d} {worst[d]:.1e} / {worst_hf[d]:.1e}" for d in DTYPES))
    pipe = p.get("pipeline", {})
    if pipe.get("status") == "ok":
        lines.append(f"pipeline p=2 + consolidation: tokens match {pipe['tokens_match']}, "
                     f"after it {pipe['after_consolidation_match']}, mid-stream "
                     f"{pipe['consolidated_mid_stream']}")
    h = p.get("h2d", {})
    if h.get("status") == "ok":
        lines.append(f"h2d GB/s: registered {_fig(h['registered_gbps'])}, pinned "
                     f"{_fig(h['pinned_gbps'])} (registered/pinned "
                     f"{_fig(h['registered_to_pinned'])}, target 0.9), pageable "
                     f"{_fig(h['pageable_gbps'])}")
    s = p.get("speed", {})
    if s.get("status") == "ok":
        e, t = s["engine"], s["transformers"]
        lines.append(f"TPOT ms b1/b8: engine {e['tpot_ms_batch1']}/{e['tpot_ms_batch8']}, "
                     f"transformers {t['tpot_ms_batch1']}/{t['tpot_ms_batch8']}; prefill tok/s: "
                     f"engine {e['prefill_tok_s']}, transformers {t['prefill_tok_s']}")
    c = p.get("coldstart", {})
    if c.get("status") == "ok":
        lines.append(f"cold start (warm runtime): TTFT {c['ttft_s']} s, p={c['placement_p']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
