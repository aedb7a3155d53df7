"""The fabric's manager: servers pooled with their capacity and leases, quotas granted
against it as signed capability tokens, clients told where to go and moved when a server
leaves. State lives in the keystore's database (``state.py``); ``service.py`` serves the
protocol (``protocol.py``); ``client.py`` is how servers, clients and operators talk to it.
"""
