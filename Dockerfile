# One image for the API and the worker. The API installs the server extra and never imports
# torch; the worker target adds the worker extra (torch, a CUDA build from PyPI, for the GPU
# workers). Both can keep artifacts in S3 (the s3 extra; NCLAB_ARTIFACT_ROOT=s3://...).
FROM python:3.11-slim AS api
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY service service
COPY worker worker
COPY migrations migrations
RUN pip install --no-cache-dir -e '.[server,s3]'
ENV NCLAB_DATA_DIR=/data
EXPOSE 8000
CMD ["nclab", "api", "--host", "0.0.0.0", "--port", "8000"]

FROM api AS worker
RUN pip install --no-cache-dir -e '.[worker,s3]'
CMD ["nclab", "worker"]

# Flower, Celery's own monitor of workers and tasks (docker-compose's `flower`).
FROM api AS flower
RUN pip install --no-cache-dir 'flower>=2.0'
EXPOSE 5555
CMD ["celery", "--app", "service.queue", "flower", "--address=0.0.0.0", "--port=5555"]
