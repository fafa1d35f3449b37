from pdserve.server.decode.main import main

main()
