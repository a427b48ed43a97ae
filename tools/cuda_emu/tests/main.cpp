// Runs the emulator's tests (harness.h); --list names them.
#include <chrono>
#include <exception>

#include "harness.h"

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "--list") == 0) {
    for (const auto& t : emu_test::registry()) std::printf("%s\n", t.name);
    return 0;
  }
  int failed = 0, ran = 0;
  for (const auto& t : emu_test::registry()) {
    bool wanted = argc < 2;
    for (int i = 1; i < argc; ++i)  // "=name": that test only
      wanted = wanted || (argv[i][0] == '=' ? std::strcmp(t.name, argv[i] + 1) == 0 : std::strstr(t.name, argv[i]) != nullptr);
    if (!wanted) continue;
    ++ran;
    emu_test::failures() = 0;
    const auto t0 = std::chrono::steady_clock::now();
    std::printf("RUN  %s\n", t.name);
    std::fflush(stdout);
    try {
      t.fn();
    } catch (const std::exception& e) {
      std::printf("  FAIL exception: %s\n", e.what());
      ++emu_test::failures();
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%s %s (%.1f s, %d failed checks)\n", emu_test::failures() ? "FAIL" : "PASS", t.name, s,
                emu_test::failures());
    std::fflush(stdout);
    if (emu_test::failures()) ++failed;
  }
  std::printf("%d of %d tests failed\n", failed, ran);
  return failed > 100 ? 100 : failed;
}
