"""The package's version, apart from the package so that any module (the Prometheus
export, the CLI) can name it without importing everything ``cryptoplane`` imports."""

__version__ = "0.2.0"
