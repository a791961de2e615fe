from cmdtool.cli import main

main()
