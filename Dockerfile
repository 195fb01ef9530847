# sse-llm as a container: the service only; PostgreSQL runs beside it (see compose.yaml).
FROM python:3.12-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY sse_llm ./sse_llm
COPY migrations ./migrations
COPY templates ./templates
COPY static ./static
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 sse-llm

USER sse-llm
ENV SSE_LLM_HOST=0.0.0.0 \
    SSE_LLM_PORT=8000 \
    PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
    CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"
# exec form: the service gets SIGTERM directly and drains its streams.
CMD ["sse-llm", "serve"]
