import shutil, sys, tempfile, time, torch
from pathlib import Path
sys.path.insert(0, "benchmarks")
from attention_kernels import Timer, paged_inputs, NUM_KV_HEADS
from platforms.cuda import build
from platforms.cuda.backend import split_plan
from torch.utils.cpp_extension import load

def variant(stages):
    if stages == 2:
        return build.load_extension()
    d = Path(tempfile.mkdtemp()) 
    for f in build.CSRC.iterdir():
        shutil.copy(f, d / f.name)
    p = d / "decode_mma.cuh"; p.write_text(p.read_text().replace("kStages = 2;", f"kStages = {stages};"))
    t = time.time()
    cap = torch.cuda.get_device_capability()
    ext = load(name=f"variant_s{stages}", sources=[str(d / n) for n in build.SOURCES],
               extra_cflags=["-O3"], extra_cuda_cflags=["-O3", build.arch_flag(cap)], build_directory=str(d))
    print(f"built stages={stages} in {time.time()-t:.0f}s", flush=True)
    return ext

timer = Timer(30)
CONFIGS = [(64,128,2048),(128,128,2048),(128,32,512),(128,32,4096),(128,256,4096),(64,256,4096),(128,8,4096),(128,1,32768)]
def run(ext, label, identity=False):
    cells = []
    for D, B, L in CONFIGS:
        q, k, v, kc, vc, slots, bt, sl, qsl = paged_inputs(B, L, 1, D)
        if identity:
            bt = torch.arange(bt.numel(), device="cuda", dtype=torch.int32).view_as(bt)
        out = torch.empty_like(q)
        part, splits = split_plan(B, NUM_KV_HEADS, L, 132)
        ms = timer.ms(lambda: ext.decode(out, q, kc, vc, bt, sl, qsl, D ** -0.5, part, splits, True, True))
        cells.append(f"{2 * B * L * NUM_KV_HEADS * D * 2 / (ms * 1e-3) / 1e12:.2f}")
        del q, k, v, kc, vc
        torch.cuda.empty_cache()
    print(f"{label:<24}" + " ".join(f"{c:>13}" for c in cells), flush=True)

print(f"{'variant (TB/s)':<24}" + X)
run(variant(2), "stages=2")
run(variant(2), "stages=2 identity-bt", identity=True)
for st in (3, 4):
    try:
        run(variant(st), f"stages={st}")
    except Exception as e:
        print("variant", st, "failed:", type(e).__name__, str(e)[-500:])
