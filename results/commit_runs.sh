#!/usr/bin/env bash
# Commit a study's run directories while its runs go on, so that a study that outlives a
# machine resumes from git: every 5 minutes, if anything under PATHS changed, one commit.
# A run writes each file whole (starlora.io's atomic writes) and its files together at the
# end of a phase; the commit waits until no file under PATHS but the runs' logs (progress
# bars, written all the time) has changed for 20 seconds, so it holds the files of one phase
# boundary, a state a killed run resumes from. Adapters and locks are kept out by the study's
# .gitignore.
#
#   nohup bash results/commit_runs.sh "results/study-2/runs results/study-2/run_study.log" \
#       "study 2 (issue 35, confirmatory)" >> commit_runs.log 2>&1 &
set -u
paths=$1; label=$2; every=${3:-300}
cd "$(git rev-parse --show-toplevel)" || exit 1
# shellcheck disable=SC2086  # PATHS is a space-separated list of paths
while true; do
  sleep "$every"
  while [ -n "$(find $paths -type f ! -name '*.log' -newermt '-20 seconds' -print -quit 2>/dev/null)" ]; do
    sleep 10
  done
  if [ -n "$(git status --porcelain -- $paths)" ]; then
    git add -A -- $paths && git commit -q -m "$label: run directories at phase boundaries $(date +%H:%M)" \
      && echo "$(date) committed"
  fi
done
