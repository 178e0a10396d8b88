"""Ray Jobs entrypoint for `rayseg segment` (same arguments, or --config with the same names).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/segment.py --config jobs/configs/segment.yaml --output s3://bucket/masks/run1
"""

from _entry import exit_now, run

if __name__ == "__main__":
    exit_now(run("segment"))
