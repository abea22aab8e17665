from hpcdask.entry import main

main()
