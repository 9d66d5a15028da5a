"""Error of log_prob with the exact denoiser against the closed-form densities of the verify toys:
max |error| over 32 exact samples (seed 20000, the checks' draw), RK4, exact divergence, routes M and Q."""
import json
import platform
import sys
import time

import torch

torch.set_num_threads(1)
from qmanifold import QuotientDiffusion, make_interpolant
from qmanifold.verify.runner import ExactDenoiser, builtin_case

interp = make_interpolant("linear")
rows = []
for dtype, steps_list in ((torch.float64, (10, 20, 40, 80)), (torch.float32, (40,))):
    for name in ("so2", "se3", "torus", "permutations"):
        case = builtin_case(name)
        model = QuotientDiffusion(case.quotient, ExactDenoiser(case, interp), interp, validate=False)
        x1 = case.target.sample(32, torch.Generator().manual_seed(20_000), dtype=torch.float64)
        exact_m, exact_q = case.target.log_density(x1), case.target.log_density(x1, "quotient")
        x = case.to_group(x1).to(dtype)
        for steps in steps_list:
            row = {"target": name, "dtype": str(dtype).replace("torch.", ""), "steps": steps, "n": 32}
            res = {}
            for route in (("M", "Q") if case.has_fibres else ("M",)):
                t0 = time.process_time()
                out = model.log_prob(x, steps=steps, route=route, return_details=True)
                row[f"cpu_s_{route}"] = time.process_time() - t0
                res[route] = out
                row[f"max_err_Q_route{route}"] = float((out["log_prob_quotient"].double() - exact_q).abs().max())
                row[f"max_err_M_route{route}"] = float((out["log_prob_total"].double() - exact_m).abs().max())
                row[f"mean_err_Q_route{route}"] = float((out["log_prob_quotient"].double() - exact_q).abs().mean())
            if "Q" in res:
                row["max_route_gap"] = float((res["Q"]["log_prob_quotient"] - res["M"]["log_prob_quotient"]).abs().max())
            rows.append(row)
            print(json.dumps(row), flush=True)
meta = {"command": "python /tmp/vq/error_table.py (copied as benchmarks/runs/verify_likelihood/error_table.py)",
        "torch": torch.__version__, "threads": 1, "machine": platform.processor() or platform.machine()}
with open(sys.argv[1], "w") as fh:
    json.dump({"meta": meta, "rows": rows}, fh, indent=1)
