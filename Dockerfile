# The backout worker (and the demo shop services, which share this image).
#   docker build -t backout:local .
#   docker run --rm backout:local --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# .dockerignore keeps the venv, tests, caches and local databases out of the context.
COPY . .
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /app --no-create-home backout \
    && chown backout /app

USER backout

EXPOSE 6066

ENTRYPOINT ["backout"]
CMD ["worker"]
