# puma's settings for dream (puma -C puma.rb config.ru).
# The socket: the one dream hands over as systemd does (LISTEN_FDS), only.
bind_to_activated_sockets "only"
threads 4, 4
# A connection is accepted only by a thread free to serve it, so a draining
# puma holds nothing it has not started: the next generation takes the rest
# from the shared backlog (with the reactor, connections puma had accepted
# but not read were reset at its stop).
queue_requests false
# Exit 0 after a graceful stop (dream's drain), not by re-raising SIGTERM.
raise_exception_on_sigterm false
