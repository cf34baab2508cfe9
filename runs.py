"""
A run's checkpoints and its folder: checkpoints written atomically and read back into a model with its full
config; the folder's lock, a run that --overwrite=True replaces kept aside until its replacement saves, and what
a killed process left behind.
"""

import atexit
import errno
import glob
import os
import shutil
import socket
import time

import torch

import kernels
from model import GPT, GPTConfig
from options import one_line


def save_checkpoint(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename: a crash mid-write never
    replaces the previous checkpoint with a half-written one (a kill -9 leaves the temporary <path>.tmp<pid>,
    which tidy_run_dir removes at the next start). A write that fails (a full disk) is a one-line error."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write as a RuntimeError whose context is the OSError
        err = e if isinstance(e, OSError) else e.__context__
        if not isinstance(err, OSError):
            raise
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        raise SystemExit(f"checkpoint error: could not write {path} ({err.strerror or one_line(err)}); the previous "
                         f"{os.path.basename(path)} is kept; {'free disk space' if full else 'fix the folder'} and "
                         "resume with --init_from=resume") from None
    finally:
        if os.path.exists(tmp):  # the write failed or was interrupted: drop the partial file
            os.remove(tmp)


# The run folder. train.py holds LOCK_FILE for as long as it writes the folder (lock_out_dir); --overwrite=True
# moves the previous run's RUN_FILES into ASIDE and deletes them only once the new run has saved a checkpoint.
LOCK_FILE, ASIDE, RUN_FILES = "train.lock", "previous-run", ("ckpt.pt", "best.pt", "log.csv", "wandb")


def lock_out_dir(out_dir, prefix="train error"):
    """Hold out_dir/train.lock until this process exits: an exclusive fcntl lock, which the kernel drops when
    the process ends however it ends, on a file naming the holder. Another holder is a one-line error naming
    it; a file left by a killed process (its lock gone with it) is taken over. Returns the locked file."""
    import fcntl

    path = os.path.join(out_dir, LOCK_FILE)
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            break
        except OSError as e:  # a file system without locks: say so, and go on as before locks existed
            f.close()
            print(f"{out_dir}: cannot lock {LOCK_FILE} ({e.strerror or one_line(e)}); nothing stops a second training "
                  "from writing this folder")
            return None
        if os.path.exists(path) and os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
            return _take(f, path, out_dir)
        f.close()  # its holder removed the file between our open and our lock: lock the one there now
    holder = ""
    for _ in range(10):  # a holder that has just locked writes its PID within microseconds
        f.seek(0)
        holder = one_line(f.read())
        if holder:
            break
        time.sleep(0.05)
    f.close()
    raise SystemExit(f"{prefix}: {out_dir} is in use by another training ({holder or 'one that is just starting'}); "
                     "wait for it to end or stop it, or choose another --out_dir")


def _take(f, path, out_dir):
    """The lock is ours: name this process in its file (a name already there is a killed holder's)."""
    f.seek(0)
    stale = one_line(f.read())
    if stale:
        print(f"{out_dir}: taking over the lock file of a training that is no longer running ({stale})")
    f.seek(0)
    f.truncate()
    f.write(f"PID {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    atexit.register(_unlock, f, path)
    return f


def _unlock(f, path):
    try:
        os.remove(path)  # while still locked: nobody else can hold this file now
    except OSError:
        pass
    f.close()


def set_aside(out_dir):
    """--overwrite=True: move the previous run's files into out_dir/previous-run (restore_aside puts them back,
    drop_aside deletes them). Returns the names moved."""
    aside = os.path.join(out_dir, ASIDE)
    os.makedirs(aside)
    moved = [f for f in RUN_FILES if os.path.lexists(os.path.join(out_dir, f))]
    for f in moved:
        os.replace(os.path.join(out_dir, f), os.path.join(aside, f))
    return moved


def restore_aside(out_dir):
    """Put a run set aside back in place of a replacement that never saved a checkpoint (whose files go)."""
    aside = os.path.join(out_dir, ASIDE)
    if not os.path.isdir(aside):
        return False
    for f in RUN_FILES:
        new, old = os.path.join(out_dir, f), os.path.join(aside, f)
        if os.path.isdir(new) and not os.path.islink(new):
            shutil.rmtree(new)
        elif os.path.lexists(new):
            os.remove(new)
        if os.path.lexists(old):
            os.replace(old, new)
    shutil.rmtree(aside)
    return True


def drop_aside(out_dir):
    shutil.rmtree(os.path.join(out_dir, ASIDE), ignore_errors=True)


def tidy_run_dir(out_dir):
    """At the start of a training that holds the lock: what an earlier process killed mid-way left behind. The
    temporary files of interrupted saves go; a run set aside by an --overwrite=True whose replacement never
    saved a checkpoint comes back (one that did: the set-aside run goes). Returns what it did, as lines."""
    done = []
    tmps = [p for p in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp*"))
            if os.path.basename(p).split(".tmp")[0] in RUN_FILES]
    for p in tmps:  # (before anything is removed: a folder in the way is the user's, and stops the run)
        if os.path.isdir(p) and not os.path.islink(p):
            raise SystemExit(f"train error: {p} is a folder named like the temporary file of an interrupted save, "
                             f"which train.py removes at the start of a run; move it out of {out_dir}")
    for name in RUN_FILES[:-1]:  # the run's own files (wandb/ is a folder)
        p = os.path.join(out_dir, name)
        if os.path.isdir(p) and not os.path.islink(p):
            raise SystemExit(f"train error: {p} is a folder where the run keeps its {name} file; move it out of "
                             f"{out_dir} (or train into another --out_dir)")
    for p in tmps:
        os.remove(p)
    if tmps:
        done.append(f"removed {len(tmps)} temporary file(s) of interrupted saves ({', '.join(map(os.path.basename, tmps))})")
    if os.path.isdir(os.path.join(out_dir, ASIDE)):
        if os.path.exists(os.path.join(out_dir, "ckpt.pt")):
            drop_aside(out_dir)
            done.append(f"removed {ASIDE}/, the run an --overwrite=True replaced (its replacement saved a checkpoint)")
        else:
            restore_aside(out_dir)
            done.append(f"restored the run that an interrupted --overwrite=True had moved to {ASIDE}/ (its "
                        "replacement saved no checkpoint)")
    return done


def load_checkpoint(out_dir_or_file, device="cpu"):
    path = out_dir_or_file
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        folder = os.path.dirname(path)
        if os.path.exists(os.path.join(folder, ASIDE, "ckpt.pt")):
            raise SystemExit(f"checkpoint not found: {path}; an interrupted --overwrite=True left the previous run in "
                             f"{os.path.join(folder, ASIDE)}: the next train.py into {folder} restores it, or read it "
                             f"there ({os.path.join(folder, ASIDE, 'ckpt.pt')})")
        if os.path.basename(path) == "ckpt.pt" and os.path.exists(os.path.join(folder, "best.pt")):
            raise SystemExit(f"checkpoint not found: {path}; {folder} holds best.pt (the best evaluation's weights): pass "
                             f"{os.path.join(folder, 'best.pt')}")
        raise SystemExit(f"checkpoint not found: {path}; train one with `python train.py ... --out_dir=DIR` "
                         "or pass the out_dir of an existing run")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated or not a torch file
        raise SystemExit(f"checkpoint unreadable: {path} ({type(e).__name__}: {one_line(e)[:120]}); "
                         "it may be truncated: use another checkpoint or retrain") from None
    # a torch file of another project: say so here, not with a KeyError wherever a field is first read
    why = None
    if not (isinstance(ckpt, dict) and all(isinstance(ckpt.get(k), dict) for k in ("model", "model_args", "config"))):
        why = "no model, model_args and config dicts"
    elif "dataset" not in ckpt["config"] or "iter_num" not in ckpt:
        why = "no dataset in its config, or no iter_num"
    else:
        try:
            GPTConfig(**ckpt["model_args"])
        except (TypeError, ValueError) as e:  # fields this GPTConfig does not have, or values it refuses
            why = f"its model_args do not describe a model of this repo: {one_line(e)[:160]}"
    if why:
        raise SystemExit(f"checkpoint error: {path} is not a checkpoint of this repo's train.py ({why}); "
                         "pass the out_dir of a run trained with train.py")
    return ckpt


def checked_config(model_args, device="cpu", needs_grad=False, **overrides):
    """The GPTConfig of model_args with keyword overrides (reweight_p, attn_backend, ...), checked before anything
    runs: an override it refuses, or a backend that cannot compute its attention on device (the backends would
    raise only when first called, mid-run), is a one-line error naming the fix."""
    try:
        cfg = GPTConfig(**model_args).with_overrides(**overrides)
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None
    if cfg.attn_backend not in ("auto", "reference"):
        q = torch.zeros(1, 1, 1, cfg.n_embd // cfg.n_head, device=device)  # what the backends look at: device, size
        for spec in dict.fromkeys(cfg.layer_specs):  # every layer's attention, each once
            why = kernels.why_not(cfg.attn_backend, spec, q, needs_grad)
            if why:
                what = f"attn={cfg.describe()}" if not cfg.layers else \
                    f"the layers {cfg.layers} ({spec.kind}, window {spec.window})"
                raise SystemExit(f"config error: attn_backend={cfg.attn_backend!r} cannot run {what} here: {why}; use "
                                 "--attn_backend=auto (or math)")
    return cfg


def model_from_checkpoint(ckpt, device="cpu", reader=True, **overrides):
    """Rebuild the GPT a checkpoint was trained as (attention, p, positions, sizes: its model_args, read through
    GPTConfig, which also resolves checkpoints stored before the canonical form, e.g. ('lssar', 0.0) -> ('lssa',
    15.0)); keyword overrides change eval-time fields such as reweight_p or attn_backend without retraining.
    reader (every script but train.py): a checkpoint saved before its curriculum switched the re-weighting on
    (train.py's reweight_start) is refused, since it would be evaluated as what it is not yet."""
    start = ckpt.get("config", {}).get("reweight_start", 0)
    if reader and ckpt.get("iter_num", start) < start:  # (checkpoints before iter_num was stored: no curriculum)
        raise SystemExit(f"checkpoint error: this checkpoint is at iteration {ckpt['iter_num']}, before its "
                         f"reweight_start={start}: its re-weighting is not on yet; evaluate it once it has trained "
                         f"past step {start} (or pass --reweight_p=0 to a copy trained without it)")
    model = GPT(checked_config(ckpt["model_args"], device, **overrides))
    state = ckpt["model"]
    prefix = "_orig_mod."  # torch.compile'd models save their weights under this prefix
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # missing, unexpected or mis-shaped weights: another project's, or edited
        raise SystemExit(f"checkpoint error: its weights do not fit the model its model_args describe "
                         f"({one_line(e)[:200]}); use a checkpoint written by this repo's train.py") from None
    return model.to(device)
