"""Small shared builders for the tests."""

import torch
import torch.nn.functional as F

from hybridlm.config import HybridConfig, preset
from hybridlm.model import HybridLM

# a ~0.6M-parameter model (M, MLP, attention, MLP) on the default 4096-token vocabulary
TINY_MODEL = dict(vocab_size=4096, d_model=64, pattern="M-*-", n_heads=2, n_kv_heads=1, head_dim=32,
                  ffn_dim=128, ssm_state=16, mamba_head_dim=16, n_groups=1, chunk_size=16)


def small_config(**overrides) -> HybridConfig:
    """All three layer kinds, GQA, 2 groups, chunk smaller than the test sequences."""
    base = dict(vocab_size=97, d_model=64, pattern="M*-M-*M", n_heads=4, n_kv_heads=2, head_dim=16,
                ffn_dim=128, ssm_state=8, mamba_head_dim=16, n_groups=2, chunk_size=8)
    return preset("tiny", **{**base, **overrides})


def small_model(seed: int = 0, **overrides) -> HybridLM:
    torch.manual_seed(seed)
    model = HybridLM(small_config(**overrides))
    with torch.no_grad():  # move the SSM/norm parameters away from their init so tests see them
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "D")):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def left_padded_pair(len_a: int, len_b: int, seed: int, vocab: int = 97):
    """Two random prompts a (1, len_a), b (1, len_b < len_a) and their left-padded batch + mask."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, vocab, (1, len_a), generator=gen), torch.randint(0, vocab, (1, len_b), generator=gen)
    ids = torch.zeros(2, len_a, dtype=torch.long)
    ids[0], ids[1, len_a - len_b:] = a[0], b[0]
    mask = torch.ones(2, len_a, dtype=torch.bool)
    mask[1, :len_a - len_b] = False
    return a, b, ids, mask


ALL_ON = dict(qk_norm="layernorm", post_proj_norm="rmsnorm", post_fc2_norm="layernorm",
              mamba_out_norm="rmsnorm", attn_logit_softcap=2.0)


def one_layer(pattern: str, seed: int = 0, **options) -> HybridLM:
    """A float64 model with random (not identity) weights in every norm, including the new ones.

    (Norms compute in float32, as in the reference implementation, hence tolerances of 1e-6.)"""
    torch.manual_seed(seed)
    model = HybridLM(small_config(pattern=pattern, **options)).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def ids_for(model: HybridLM, b: int = 2, l: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, model.cfg.vocab_size, (b, l), generator=torch.Generator().manual_seed(seed))


# ---- stability options: float64 one-layer models and hand computations ----
def rms(x, w, eps=1e-5):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def norm_of(module, x):
    """The stability norm `module` (RMSNorm or LayerNorm), written out by hand."""
    if hasattr(module, "bias"):
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return module.weight * (x - mu) / torch.sqrt(var + 1e-5) + module.bias
    return rms(x, module.weight)


def head_out(model, x):
    return F.linear(rms(x, model.backbone.norm_f.weight), model.lm_head.weight)


# ---- the HTTP server ----
def sse_payloads(lines) -> list:
    """The payloads of a server-sent event stream's ``data:`` lines: parsed JSON objects, then "[DONE]"."""
    import json

    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


SERVED_NAME, SERVED_CONTEXT = "tiny-test", 512   # the model behind tests/serve/conftest.py's `server`


def text_model(context: int = 512, seed: int = 1) -> HybridLM:
    """`TINY_MODEL` (the bundled tokenizer's vocabulary) with a `context`-token limit, random weights."""
    torch.manual_seed(seed)
    return HybridLM(HybridConfig(**{**TINY_MODEL, "max_seq_len": context})).eval()


def serving(model, tokenizer, max_batch: int = 8, max_queue: int = 32, **settings):
    """`hybridlm serve` in this process with one intra-op thread (a context manager yielding the
    `BackgroundServer`, its `engine` attached); `settings` are `ServerSettings` fields."""
    from contextlib import contextmanager

    from hybridlm.serve.app import BackgroundServer, ServerSettings, create_app
    from hybridlm.serve.engine import Engine

    @contextmanager
    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
            with BackgroundServer(create_app(engine, tokenizer, ServerSettings(**settings))) as srv:
                srv.engine = engine
                yield srv
        finally:
            torch.set_num_threads(threads)
    return run()


# ---- multi-process tests: torchrun with CPU (gloo) processes ----
# One process group per launch for all the runs in it: train() uses a group it finds initialized
# (and leaves it alone); re-creating the default group in one torchrun process could read stale
# peer addresses from the launcher's store.
TRAIN_CONFIGS_SCRIPT = """
import json, sys
import torch.distributed as dist
from hybridlm.training import TrainConfig, train
dist.init_process_group("gloo")
for cfg in json.loads(open(sys.argv[1]).read()):
    train(TrainConfig(**cfg))
dist.destroy_process_group()
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, root, args=(), nproc: int = 2, timeout: float = 180):
    """Run the Python source `script` (written to root/run.py) under torchrun with `nproc` CPU
    processes and `args`; asserts it succeeded and returns the CompletedProcess."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(root) / "run.py"
    path.write_text(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(path), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def torchrun_train(configs: list, root, nproc: int = 2, timeout: float = 180):
    """`train(TrainConfig(**cfg))` for each dict in `configs`, in order, in one torchrun launch."""
    import json
    from pathlib import Path

    (Path(root) / "configs.json").write_text(json.dumps(configs))
    return torchrun(TRAIN_CONFIGS_SCRIPT, root, [Path(root) / "configs.json"], nproc, timeout)


# ---- tensor parallelism / DCP resume: a tiny model that splits in two (heads, KV heads, Mamba heads
# and groups, FFN), with all three layer kinds and two Mamba groups
TP_MODEL = dict(TINY_MODEL, pattern="M*-M", n_heads=4, n_kv_heads=2, head_dim=16, n_groups=2)
TP_MICRO = 2  # per-rank batch of the TP x FSDP2 runs (dp = 2); one process uses 2 * TP_MICRO


def tp_train_config(model: str, data, out, **kw) -> dict:
    """TrainConfig kwargs of the TP / DCP tests: 4 steps, checkpoints at 2 and 4, validation at the
    start and the end (one batch), one process unless `kw` says otherwise."""
    base = dict(model=model, data=str(data), out=str(out), steps=4, batch_size=2 * TP_MICRO, seq_len=32, lr=1e-3,
                min_lr=1e-4, warmup_steps=1, eval_every=0, eval_batches=1, save_every=2, keep_last=0, log_every=1,
                progress=False, device="cpu", distributed="none")
    return {**base, **kw}


def truncate_run(src, dst, step: int) -> None:
    """Copy run directory `src` to `dst` without the checkpoints after `step` (`latest` -> step)."""
    import shutil
    from pathlib import Path

    from hybridlm.training.checkpoints import CKPT_DIR, LATEST, checkpoint_name, list_checkpoints

    shutil.copytree(src, dst)
    for ckpt in list_checkpoints(dst):
        if int(ckpt.name[5:]) > step:
            shutil.rmtree(ckpt)
    shutil.rmtree(Path(dst) / "final", ignore_errors=True)
    (Path(dst) / CKPT_DIR / LATEST).write_text(checkpoint_name(step) + "\n")


def run_train_actions(actions: list) -> None:
    """Run, in order (in this process or on every torchrun rank): {"train": TrainConfig kwargs} and
    optionally "dump": a path where rank 0 saves the full model/optimizer state right after the start
    (the weights a resume loaded), before training; {"truncate": [src, dst, step]} (rank 0, then a barrier)."""
    import torch
    import torch.distributed as dist

    from hybridlm.training import distributed as D
    from hybridlm.training.loop import _Run
    from hybridlm.training.train_config import TrainConfig

    rank = dist.get_rank() if dist.is_initialized() else 0
    for action in actions:
        if "truncate" in action:
            if rank == 0:
                truncate_run(*action["truncate"])
            if dist.is_initialized():
                dist.barrier()
            continue
        tc = TrainConfig(**action["train"])
        env = D.setup(tc.distributed, tc.device, tc.tp)
        try:  # train(), with a look at the state it starts from
            run = _Run.start(tc, env, None)
            if action.get("dump"):
                model_sd, optim_sd = D.full_state(run.model, run.opt)
                if rank == 0:
                    torch.save({"model": model_sd, "optimizer": optim_sd}, action["dump"])
            run.fit()
        finally:
            D.teardown(env)


TESTS_DIR = __import__("os").path.dirname(__import__("os").path.abspath(__file__))
TRAIN_ACTIONS_SCRIPT = f"""
import json, sys
sys.path.insert(0, {TESTS_DIR!r})
import torch.distributed as dist
from helpers import run_train_actions
dist.init_process_group("gloo")
run_train_actions(json.loads(open(sys.argv[1]).read()))
dist.destroy_process_group()
"""


def torchrun_actions(actions: list, root, nproc: int, timeout: float = 240):
    """`run_train_actions(actions)` on `nproc` torchrun CPU processes (one process group for all)."""
    import json
    from pathlib import Path

    (Path(root) / "actions.json").write_text(json.dumps(actions))
    return torchrun(TRAIN_ACTIONS_SCRIPT, root, [Path(root) / "actions.json"], nproc, timeout)
