from pdserve.server.decode.servicer import main

main()
