# syntax=docker/dockerfile:1
# Build stage: install pgvouch and its dependencies into a virtualenv.
FROM python:3.11-slim AS build
RUN python -m venv /opt/pgvouch
COPY pyproject.toml README.md /src/
COPY proxy /src/proxy
COPY policies /src/policies
COPY approvals /src/approvals
COPY config /src/config
COPY scripts/build_speedups.py /src/scripts/
RUN /opt/pgvouch/bin/pip install --no-cache-dir /src
# The relay's hot modules compiled with mypyc (see scripts/build_speedups.py),
# then the package installed again with them; the runtime stage needs no compiler.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && /opt/pgvouch/bin/pip install --no-cache-dir mypy \
    && /opt/pgvouch/bin/python /src/scripts/build_speedups.py --check \
    && /opt/pgvouch/bin/pip install --no-cache-dir --no-deps --force-reinstall /src \
    && /opt/pgvouch/bin/pip uninstall -y mypy mypy_extensions

# Runtime stage: the virtualenv only, running as an unprivileged user.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin pgvouch \
    && mkdir -p /var/lib/pgvouch && chown pgvouch /var/lib/pgvouch
COPY --from=build /opt/pgvouch /opt/pgvouch
COPY config /etc/pgvouch
ENV PATH=/opt/pgvouch/bin:$PATH
USER pgvouch
# the default store, sqlite:///pgvouch.db, lives in the working directory
WORKDIR /var/lib/pgvouch
EXPOSE 6432 8432
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8432/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["pgvouch", "serve"]
CMD ["--config", "/etc/pgvouch/pgvouch.yaml"]
