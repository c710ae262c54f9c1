# `lumina2` in a container; by default `lumina2 serve` on port 8080.
#
#   docker build -t lumina2 .
#   docker run -p 8080:8080 -v lumina2-hf:/data/hf lumina2
#       (the Hugging Face cache in a volume: the model is downloaded once)
#   docker run -p 8080:8080 -v /path/to/Lumina-Image-2.0:/models/lumina2:ro lumina2 \
#       serve --host 0.0.0.0 --model /models/lumina2
#       (a local diffusers pipeline folder, no network)
#
# A CPU build; for NVIDIA GPUs build from an nvidia/cuda devel image with
# `--features cuda` and run on its runtime image (see the README's GPU build).

FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p lumina2-cli \
    && install -m 0755 target/release/lumina2 /usr/local/bin/lumina2

FROM debian:bookworm-slim
# CA certificates: the Hugging Face Hub is reached over HTTPS. Not pinned
# (DL3008): the image should take the distribution's current certificates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /data lumina2 \
    && mkdir -p /data/hf /models \
    && chown -R lumina2 /data
COPY --from=build /usr/local/bin/lumina2 /usr/local/bin/lumina2
ENV HF_HOME=/data/hf
VOLUME ["/data/hf"]
USER 10001
WORKDIR /data
EXPOSE 8080
ENTRYPOINT ["lumina2"]
# The server listens at once and loads the model in the background:
# /health answers while it loads, /ready once it is loaded.
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
