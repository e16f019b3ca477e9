"""Closure of vllm 0.26.0's runtime requirements the device image lacks.

Downloads py3.12 / manylinux x86_64 wheels (--no-deps) into dl/, iterating
over Requires-Dist until nothing new is needed. Prints a log of decisions.
"""
import os, re, subprocess, sys, zipfile, email.parser, json
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

HERE = os.path.dirname(os.path.abspath(__file__))
DL = os.path.join(HERE, "dl")
os.makedirs(DL, exist_ok=True)

KINDS = open("/work/.library/device/KINDS.md").read()
m = re.search(r"Packages: (.*?)\.\n", KINDS)
DEVICE = {canonicalize_name(x.strip()) for x in m.group(1).split(",")}

# big GPU stuff / things we deliberately do not carry
EXCLUDE_PAT = re.compile(r"^(torch.*|triton.*|nvidia-.*|cuda-.*|flashinfer.*|tilelang|"
                         r"pynvvideocodec|quack-kernels|tokenspeed-mla|humming-kernels|"
                         r"cupy.*|jax.*)$")

# pins from DESIGN.md
PINS = {
    "vllm": "==0.26.0",
    "apache-tvm-ffi": "==0.1.10",
    "xgrammar": "==0.2.7",
    "pydantic": "==2.14.3",
    "pydantic-core": "==2.50.4",
    "fastapi": "<0.137",
    "llguidance": "<1.8",
}

ENV_BASE = dict(python_version="3.12", python_full_version="3.12.3", os_name="posix",
                sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
                platform_python_implementation="CPython", implementation_name="cpython",
                implementation_version="3.12.3", platform_release="", platform_version="")

PLAT = []
for t in ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"] + \
         [f"manylinux_2_{n}_x86_64" for n in range(5, 40)]:
    PLAT += ["--platform", t]

specs = {}      # name -> SpecifierSet
extras = {}     # name -> set of extras
why = {}        # name -> list of requirers
have = {}       # name -> (version, filename)
log = []


def download(reqs):
    cmd = [sys.executable, "-m", "pip", "download", "--isolated", "--no-deps",
           "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
           "--abi", "cp312", "--abi", "abi3", "--abi", "none", *PLAT, "-d", DL, *reqs]
    env = dict(os.environ, PIP_CONSTRAINT="")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        print("FAILED", reqs, r.stdout[-2000:], r.stderr[-2000:])
        return False
    return True


def wheels_in_dl():
    out = {}
    for f in os.listdir(DL):
        if f.endswith(".whl"):
            n, v, _, _ = parse_wheel_filename(f)
            out.setdefault(n, []).append((v, f))
    return out


def meta(fname):
    with zipfile.ZipFile(os.path.join(DL, fname)) as z:
        mp = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")][0]
        return email.parser.Parser().parsestr(z.read(mp).decode())


def add(name, spec, ex, by):
    name = canonicalize_name(name)
    s = specs.setdefault(name, SpecifierSet(PINS.get(name, "")))
    specs[name] = s & spec
    extras.setdefault(name, set()).update(ex)
    why.setdefault(name, []).append(by)


add("vllm", SpecifierSet(), set(), "root")
processed = {}   # name -> (version, frozenset extras) processed
skipped = {}
for rnd in range(30):
    todo = []
    for n, s in specs.items():
        if n in have and s.contains(have[n][0], prereleases=True):
            continue
        todo.append(n)
    if not todo:
        # (re)process metadata for extras changes
        pass
    for n in todo:
        req = f"{n}{specs[n]}"
        ok = download([req])
        if not ok:
            continue
        cands = [(v, f) for v, f in wheels_in_dl().get(n, []) if specs[n].contains(v, prereleases=True)]
        v, f = max(cands)
        have[n] = (v, f)
    changed = False
    for n, (v, f) in list(have.items()):
        key = (v, frozenset(extras.get(n, ())))
        if processed.get(n) == key:
            continue
        processed[n] = key
        changed = True
        md = meta(f)
        for line in md.get_all("Requires-Dist") or []:
            r = Requirement(line)
            rn = canonicalize_name(r.name)
            ok = False
            for e in [""] + sorted(extras.get(n, ())):
                env = dict(ENV_BASE, extra=e)
                if r.marker is None or r.marker.evaluate(env):
                    ok = True
                    break
            if not ok:
                continue
            if rn in DEVICE or EXCLUDE_PAT.match(rn):
                skipped.setdefault(rn, set()).add(f"{n}: {line}")
                continue
            add(rn, r.specifier, r.extras, f"{n}{'[' + ','.join(sorted(extras.get(n, ()))) + ']' if extras.get(n) else ''}")
    if not changed and not any(
            n not in have or not specs[n].contains(have[n][0], prereleases=True) for n in specs):
        break

res = {n: {"version": str(v), "file": f, "spec": str(specs[n]), "why": sorted(set(why[n]))}
       for n, (v, f) in sorted(have.items())}
json.dump({"have": res, "skipped": {k: sorted(v) for k, v in sorted(skipped.items())}},
          open(os.path.join(HERE, "resolve.json"), "w"), indent=1)
for n, d in res.items():
    print(f"{n}=={d['version']:<12} {os.path.getsize(os.path.join(DL, d['file']))/1e6:8.2f}MB  <- {', '.join(d['why'])[:120]}")
print("--- skipped (device has / excluded):")
for k, v in sorted(skipped.items()):
    print(k, "|", "; ".join(sorted(v))[:200])
