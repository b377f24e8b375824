"""The gRPC deployment runtime: a coordinator and one site agent per hospital, over mutual TLS.

Entry point: the ``nordfl`` command (``nordfl.runtime.cli``). Modules: ``coordinator``,
``site``, ``tls``, ``wire``, ``audit``, ``site_data``, ``config``, ``store``.
"""
