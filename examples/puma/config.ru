# A Rack app served by puma on dream's socket.
#
# Run under dream:
#   dream serve --listen :8080 --ready notify -- puma --bind-to-activated-sockets only --no-config config.ru
# puma takes the socket dream hands over as systemd does (LISTEN_FDS), and
# says READY=1 itself (its systemd integration, with the sd_notify gem) on
# the socket file dream gives it (the gem cannot use an abstract @ socket).
release = ENV.fetch("DREAM_RELEASE", "dev")
generation = ENV.fetch("DREAM_GENERATION", "0")
body = "<p>release #{release}</p>\n"
run lambda { |_env|
  [200, { "Content-Type" => "text/html", "X-Dream-Release" => release,
          "X-Dream-Generation" => generation,
          "Content-Length" => body.bytesize.to_s }, [body]]
}
