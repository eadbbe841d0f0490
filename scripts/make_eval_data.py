"""Write held-out token data sampled from a model itself (for models whose tokenizer is a stand-in)."""
import argparse

from effqat_plugin.env import prepare_runtime_env, quiet_third_party_logs


def main():
    prepare_runtime_env()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model_dir")
    ap.add_argument("out", help="output .safetensors with int64 input_ids [N, T]")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1, help="use a seed other than calibration's (0)")
    ap.add_argument("--verbose", action="store_true", help="also show torch's / transformers' own log lines")
    args = ap.parse_args()
    if not args.verbose:
        quiet_third_party_logs(imports_gptqmodel=False)
    import torch
    from transformers import AutoModelForCausalLM

    from effqat_plugin.data import sample_from_model, save_token_file

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else 1
    ids = sample_from_model(model, args.n_samples, args.seq_len, seed=args.seed, bos_token_id=bos)
    save_token_file(args.out, ids)
    print(f"wrote {tuple(ids.shape)} token ids to {args.out}")


if __name__ == "__main__":
    main()
