from moeprof.cli import main

main()
