# Sourced by the scripts/gpu_*.sh: `step NAME SECONDS command...` runs the command under a time limit, appending its
# output to $LOG and one line with its exit status and duration, so one failing step does not stop the others.
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "=== $name: exit $? after $((SECONDS - start)) s" | tee -a "$LOG"
}
