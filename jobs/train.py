"""Ray Jobs entrypoint for `rayseg train` (same arguments, or --config with the same names).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train.py --config jobs/configs/train.yaml --output s3://bucket/models/run1 --workers 8 --use-gpu
"""

from _entry import exit_now, run

if __name__ == "__main__":
    exit_now(run("train"))
