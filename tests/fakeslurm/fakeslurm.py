"""Stand-ins for sbatch, srun, sacct, scontrol and scancel that run SLURM jobs on this machine (tests/test_slurm.py).

State lives in $FAKESLURM_STATE (job counter, per-task state files, requeue markers, the scripts submitted).
- sbatch SCRIPT: reads the #SBATCH lines (--array, --output, --error, --ntasks-per-node, --nodes, --job-name),
  prints "Submitted batch job <id>" and starts one detached runner per array task.
- runner: runs the batch script with the SLURM_* variables of that task; after `scontrol requeue` it runs it
  again (SLURM_RESTART_COUNT + 1), as SLURM does.
- srun: starts nodes x tasks-per-node copies of the command with SLURM_PROCID/LOCALID/NODEID, output per task.
  With $FAKESLURM_SIGNAL_WHEN (a glob; {array_task} is replaced) it plays the pre-timeout signal: on the first
  attempt of the tasks listed in $FAKESLURM_SIGNAL_TASKS, once a file matches, it sends SIGUSR2 to every task.
- sacct -o JobID,State,NodeList --parsable2 -j ID: the states; scontrol requeue ID; scancel: no-op.
"""
import glob
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("FAKESLURM_STATE", "/tmp/fakeslurm"))


def options(lines):
    opts = {}
    for line in lines:
        for m in re.finditer(r"--([\w-]+)(?:=(\S+))?", line):
            opts[m.group(1)] = m.group(2) if m.group(2) is not None else "1"
    return opts


def expand(pattern, env, task=0):
    return (pattern.replace("%A", env.get("SLURM_ARRAY_JOB_ID", env["SLURM_JOB_ID"]))
            .replace("%a", env.get("SLURM_ARRAY_TASK_ID", "0")).replace("%j", env["SLURM_JOB_ID"])
            .replace("%t", str(task)))


def set_state(key, state):
    (STATE / f"{key}.state").write_text(state)


def sbatch(script):
    STATE.mkdir(parents=True, exist_ok=True)
    counter = STATE / "counter"
    job = int(counter.read_text()) if counter.exists() else 5000
    text = Path(script).read_text()
    opts = options(line for line in text.splitlines() if line.startswith("#SBATCH"))
    tasks = [None]
    if "array" in opts:
        first, last = re.match(r"(\d+)-(\d+)", opts["array"]).groups()
        tasks = list(range(int(first), int(last) + 1))
    counter.write_text(str(job + 1 + len(tasks)))
    (STATE / f"sbatch_{job}.sh").write_text(text)
    for i, task in enumerate(tasks):
        key = f"{job}_{task}" if task is not None else str(job)
        set_state(key, "PENDING")
        env = {**os.environ, "SLURM_JOB_ID": str(job + 1 + i) if task is not None else str(job),
               "SLURM_JOB_NAME": opts.get("job-name", "job"), "SLURM_NNODES": opts.get("nodes", "1"),
               "SLURM_JOB_NUM_NODES": opts.get("nodes", "1"), "SLURM_NTASKS_PER_NODE": opts.get("ntasks-per-node", "1"),
               "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost", "SLURM_SUBMIT_DIR": os.getcwd(),
               "FAKESLURM_KEY": key}
        env["SLURM_NTASKS"] = str(int(env["SLURM_NNODES"]) * int(env["SLURM_NTASKS_PER_NODE"]))
        if task is not None:
            env.update(SLURM_ARRAY_JOB_ID=str(job), SLURM_ARRAY_TASK_ID=str(task))
        out = expand(opts.get("output", f"slurm-{key}.out"), env)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        subprocess.Popen([sys.executable, __file__, "_runner", script, out], env=env, start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"Submitted batch job {job}")


def runner(script, out):
    key, restarts = os.environ["FAKESLURM_KEY"], 0
    marker = STATE / f"{key}.requeue"
    while True:
        set_state(key, "RUNNING")
        with open(out, "a") as log:
            code = subprocess.call(["bash", script], env={**os.environ, "SLURM_RESTART_COUNT": str(restarts)},
                                   stdout=log, stderr=subprocess.STDOUT)
        if marker.exists():  # requeued during this attempt: run the batch script again
            marker.unlink()
            restarts += 1
            (STATE / f"{key}.attempts").write_text(str(restarts + 1))
            set_state(key, "PENDING")
            continue
        set_state(key, "COMPLETED" if code == 0 else "FAILED")
        return


def srun(argv):
    i, opts = 0, {}
    while i < len(argv) and argv[i].startswith("--"):
        name, _, value = argv[i][2:].partition("=")
        if not value and name in ("output", "error"):
            value, i = argv[i + 1], i + 1
        opts[name] = value
        i += 1
    command, env = argv[i:], os.environ
    nodes, per_node = int(env.get("SLURM_NNODES", "1")), int(env.get("SLURM_NTASKS_PER_NODE", "1"))
    procs = []
    for rank in range(nodes * per_node):
        task_env = {**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per_node),
                    "SLURM_NODEID": str(rank // per_node), "SLURM_STEP_ID": "0"}
        out = open(expand(opts["output"], env, rank), "a") if "output" in opts else None
        err = open(expand(opts["error"], env, rank), "a") if "error" in opts else None
        procs.append(subprocess.Popen(command, env=task_env, stdout=out, stderr=err))
    trigger = env.get("FAKESLURM_SIGNAL_WHEN")
    wanted = env.get("FAKESLURM_SIGNAL_TASKS", "").split(",")
    if trigger and env.get("SLURM_RESTART_COUNT") == "0" and env.get("SLURM_ARRAY_TASK_ID", "0") in wanted:
        pattern = trigger.replace("{array_task}", env.get("SLURM_ARRAY_TASK_ID", "0"))
        while all(p.poll() is None for p in procs):
            if glob.glob(pattern):  # the "time limit" is near: SLURM's --signal=USR2@... to every task
                for p in procs:
                    p.send_signal(signal.SIGUSR2)
                break
            time.sleep(0.1)
    return max(p.wait() for p in procs)


def sacct(argv):
    ids = [argv[i + 1] for i, a in enumerate(argv) if a == "-j"]
    print("JobID|State|NodeList")
    for path in sorted(STATE.glob("*.state")):
        key = path.name[: -len(".state")]
        if key.split("_")[0] in ids or key in ids:
            print(f"{key}|{path.read_text()}|localhost")


def main():
    cmd, argv = Path(sys.argv[1]).name, sys.argv[2:]
    if cmd == "sbatch":
        sbatch(argv[-1])
    elif cmd == "_runner":
        runner(*argv)
    elif cmd == "srun":
        sys.exit(srun(argv))
    elif cmd == "sacct":
        sacct(argv)
    elif cmd == "scontrol" and argv[:1] == ["requeue"]:
        (STATE / f"{argv[1]}.requeue").write_text("1")
    elif cmd in ("scontrol", "scancel"):
        pass
    else:
        sys.exit(f"fakeslurm: unknown command {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
