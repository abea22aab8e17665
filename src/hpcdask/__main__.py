from hpcdask.cli import main

main()
