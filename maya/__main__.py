from maya.cli import main

main()
