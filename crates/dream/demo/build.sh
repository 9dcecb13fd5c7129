#!/bin/sh
# The demo's build step: stamp the release id into the page, so that the
# referee can check that the page and the X-Dream-Release header agree.
set -e
sed "s/@RELEASE@/$DREAM_RELEASE/g" public/index.html > public/index.html.new
mv public/index.html.new public/index.html
