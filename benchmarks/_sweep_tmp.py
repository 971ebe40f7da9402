import sys, torch
sys.path.insert(0, "benchmarks")
from attention_kernels import Timer, paged_inputs, NUM_KV_HEADS, DTYPE
from platforms.cuda.build import load_extension
from platforms.cuda.backend import split_plan
ext = load_extension()
timer = Timer(30)
print("sweep: D B L partition splits TB/s (plan marked *)")
for D, B, L in [(64,128,2048),(128,128,2048),(128,32,512),(128,32,4096),(128,256,4096),(64,256,4096),(128,8,4096),(128,1,32768)]:
    q, k, v, kc, vc, slots, bt, sl, qsl = paged_inputs(B, L, 1, D)
    out = torch.empty_like(q)
    plan = split_plan(B, NUM_KV_HEADS, L, 132)
    cells = []
    for part in sorted({256, 512, 1024, 2048, 4096, plan[0]} | ({L} if L <= 8192 else set())):
        if part > L and part != plan[0]: continue
        splits = -(-L // part)
        ms = timer.ms(lambda: ext.decode(out, q, kc, vc, bt, sl, qsl, D ** -0.5, part, splits, True, True))
        tb = 2 * B * L * NUM_KV_HEADS * D * 2 / (ms * 1e-3) / 1e12
        cells.append(f"{part}x{splits}{'*' if part == plan[0] else ''}:{tb:.2f}")
    print(D, B, L, " ".join(cells), flush=True)
    del q, k, v, kc, vc
    torch.cuda.empty_cache()
