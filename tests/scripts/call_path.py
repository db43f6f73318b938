"""The call path of one `sskd distill --method sskd --cache` run: which project files run a function
(module bodies and import-time calls left out), how many distinct caller -> callee file pairs, and how
often a manifest.json is opened (an audit hook). It makes digits shards, a 2-step teacher, SS head and
cache under WORKDIR first, then traces only the distill command's own function.

    python tests/scripts/call_path.py REPO WORKDIR     # REPO: a checkout of any commit (PYTHONPATH)
"""

import collections
import json
import os
import subprocess
import sys

repo, work = sys.argv[1], sys.argv[2]
os.makedirs(work, exist_ok=True)
env = dict(os.environ, PYTHONPATH=repo, SSKD_SUPERVISED="0")
py = sys.executable


def sskd(*a):
    subprocess.run([py, "-m", "sskd", *a], check=True, env=env, cwd=work, capture_output=True)


S = f"{work}/shards"
if not os.path.exists(f"{work}/cache/manifest.json"):
    sskd("shard", "digits", S)
    common = ["--shards", S, "--max-steps", "2", "--batch-size", "16", "--no-progress", "--epochs", "1"]
    sskd("train-teacher", "--arch", "resnet8", "--out", f"{work}/t", *common)
    sskd("train-ss-head", "--teacher", f"{work}/t", "--out", f"{work}/ts", *common)
    sskd(
        "cache",
        "--teacher",
        f"{work}/ts",
        "--method",
        "sskd",
        "--shards",
        S,
        "--epochs",
        "1",
        "--out",
        f"{work}/cache",
        "--no-progress",
    )
code = f"""
import sys, json
sys.path.insert(0, {repo!r})
seen, order, prev, crossings, edges, reads = set(), [], [None], [0], set(), [0]
def audit(event, args):
    if event == 'open' and isinstance(args[0], str) and args[0].endswith('manifest.json') and counting[0]:
        reads[0] += 1; paths.append(args[0])
counting = [False]
paths = []
sys.addaudithook(audit)
roots = tuple({repo!r} + '/' + d + '/' for d in ('sskd', 'pipelines', 'shards'))
def prof(frame, event, arg):
    if event != 'call':
        return
    f = frame.f_code.co_filename
    if not f.startswith(roots) or frame.f_code.co_name == '<module>':
        return
    g = frame.f_back
    while g is not None:  # calls made while a module is being imported are not the call path
        if (g.f_code.co_name == '<module>' and g.f_code.co_filename.startswith(roots)) or 'importlib' in g.f_code.co_filename:
            return
        g = g.f_back
    rel = f[len({repo!r}) + 1:]
    if rel not in seen:
        seen.add(rel); order.append(rel)
    caller = frame.f_back.f_code.co_filename if frame.f_back else None
    if caller and caller.startswith(roots) and caller != f:
        crossings[0] += 1
        edges.add((caller[len({repo!r}) + 1:], rel))
from sskd.cli import build_parser
args = build_parser().parse_args(['distill', '--method', 'sskd', '--teacher', {work!r} + '/ts', '--cache', {work!r} + '/cache',
           '--student', 'resnet8', '--shards', {S!r}, '--out', {work!r} + '/s', '--overwrite', '--max-steps', '2',
           '--batch-size', '16', '--no-progress', '--epochs', '1'])
sys.setprofile(prof)
import threading; threading.setprofile(prof)
counting[0] = True
rc = args.func(args)
counting[0] = False
sys.setprofile(None)
print(json.dumps({{'rc': rc, 'files': order, 'crossings': crossings[0], 'edges': len(edges), 'manifest_reads': reads[0], 'paths': paths, 'edge_list': sorted(edges)}}))
"""
out = subprocess.run([py, "-c", code], env=env, cwd=work, capture_output=True, text=True)
if out.returncode:
    print(out.stderr[-3000:])
    sys.exit(1)
res = json.loads(out.stdout.strip().splitlines()[-1])
print(
    len(res["files"]),
    "files,",
    res["edges"],
    "distinct caller->callee file pairs,",
    res["manifest_reads"],
    "manifest.json opens",
)

print(dict(collections.Counter(res["paths"])))
json.dump(res, open(work + "/trace.json", "w"), indent=1)
for f in res["files"]:
    print(" ", f)
