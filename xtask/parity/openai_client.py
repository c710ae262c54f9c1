"""`cargo xtask openai`: one image from `lumina2 serve` through OpenAI's Python client.

Asks for the `seed_cfg` fixture case (seed 42, 48x32, 4 steps) and writes the
decoded PNG; xtask compares it with the one `lumina2 generate` writes.
"""

import argparse
import base64

from openai import OpenAI


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True, help="http://ADDR/v1")
    p.add_argument("--api-key", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="where to write the PNG")
    args = p.parse_args()

    # No retries: a failure should show, not be hidden by a second attempt.
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=300)
    result = client.images.generate(
        model="lumina2",
        prompt=args.prompt,
        n=1,
        size="48x32",
        response_format="b64_json",
        extra_body={"seed": 42, "num_inference_steps": 4},
    )
    if len(result.data) != 1:
        raise SystemExit(f"expected 1 image, got {len(result.data)}")
    png = base64.b64decode(result.data[0].b64_json)
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise SystemExit("the image is not a PNG")
    with open(args.out, "wb") as f:
        f.write(png)


if __name__ == "__main__":
    main()
