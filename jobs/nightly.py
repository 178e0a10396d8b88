"""Ray Jobs entrypoint for `rayseg nightly` (same arguments, or --config with the same names).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/nightly.py --config jobs/configs/nightly.yaml --output s3://bucket/masks/nightly
"""

from _entry import exit_now, run

if __name__ == "__main__":
    exit_now(run("nightly"))
