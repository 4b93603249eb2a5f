// The end of a process stopped by a signal, as Python's own: `python script.py` stopped by
// Ctrl-C finalizes, then dies by SIGINT (its parent sees the signal, not a status; a shell
// loop stops, subprocess returns -2); SIGTERM left at its default kills it. `memprof run`
// catches both to save the profile, then ends the same way: after the interpreter's
// finalization (Py_AtExit runs last), the signal at its default action.
#include <csignal>
#include <unistd.h>

#include <Python.h>

#include "bindings.h"

namespace memprof {
namespace {

volatile std::sig_atomic_t g_exit_signal = 0;

void die_by_signal() {
  int sig = g_exit_signal;
  if (sig == 0) return;
  std::signal(sig, SIG_DFL);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, sig);
  sigprocmask(SIG_UNBLOCK, &set, nullptr);
  kill(getpid(), sig);   // (if it is ignored after all, the process exits with its status)
}

// Returns false when the interpreter has no room for another exit function.
bool exit_by_signal(int sig) {
  if (sig <= 0 || sig >= NSIG) throw std::invalid_argument("not a signal number");
  static bool registered = false;
  if (!registered) {
    if (Py_AtExit(&die_by_signal) != 0) return false;
    registered = true;
  }
  g_exit_signal = sig;
  return true;
}

}  // namespace

void register_exit_signal(pybind11::module_& m) {
  m.def("exit_by_signal", &exit_by_signal, pybind11::arg("signal"),
        "End the process by `signal` (default action) once the interpreter has finalized.");
}

}  // namespace memprof
